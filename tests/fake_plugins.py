"""Plugins written for the tests as a third party would write them: installed as real distributions
(a ``*.dist-info`` folder with entry points, and a module) in a folder put on PYTHONPATH, so both the
test process and ``finetune`` subprocesses (also ``--num-processes 2``) load them."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

from conftest import NEGATIVE, NEUTRAL, POSITIVE


def make_dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str],
              version: str = "0.1") -> Path:
    """A fake installed distribution ``dist`` in ``site`` with ``[finetune]`` entry points and modules."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[finetune]\n" + "".join(f"{name} = {module}\n" for name, module in entry_points.items()))
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site


#: A word-tagging task (one tag per word) whose evaluation outputs are ragged: per-token predictions as a
#: tensor whose width is each batch's longest sentence, references as a list of per-example tag lists.
#: ``task.bug`` makes it break the contract in one chosen way (for the guard's tests).
TAGGER = '''
from pydantic import Field

from finetune import DataOptions, DataSplits, Task, TaskOptions, attention_projections, hookimpl, read_jsonl

finetune_hook_version = "1"
TAGS = ["O", "POS", "NEG"]


class TagData(DataOptions):
    max_length: int = Field(32, gt=0, description="Tokens kept per sentence.")


class TagOptions(TaskOptions):
    bug: str = Field("none", description="Which contract violation to commit (tests).")


class Tagger(Task):
    name = "word-tagging"
    description = "Tag every word: a test task with ragged evaluation outputs."
    task_options = TagOptions
    data_options = TagData
    default_metric = "token_accuracy"
    metric_names = ("token_accuracy", "examples", "tokens")
    pipeline_tag = "token-classification"

    def prepare_data(self):
        rows = [record for _, record in read_jsonl(self.recipe.data.train)]
        n_eval = len(rows) // 4
        return DataSplits(train=rows[n_eval:], eval=rows[:n_eval], info={"eval_examples": n_eval})

    def load_model(self, backbone):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(backbone.path, local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(backbone.path, num_labels=len(TAGS),
                                                                local_files_only=True)
        return model, tokenizer

    def lora_targets(self, model):
        return attention_projections(model)

    def modules_to_save(self, model):
        return ["classifier"]

    def peft_task_type(self):
        return "TOKEN_CLS"

    def build_dataset(self, rows, tokenizer, training):
        items = []
        for row in rows:
            enc = tokenizer(row["tokens"], is_split_into_words=True, truncation=True,
                            max_length=self.recipe.data.max_length)
            labels = [-100 if w is None else TAGS.index(row["tags"][w]) for w in enc.word_ids()]
            items.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
        return items

    def example_lengths(self, dataset):
        return [len(item["input_ids"]) for item in dataset]

    def collate_fn(self, tokenizer):
        import torch

        def collate(items):
            width = max(len(item["input_ids"]) for item in items)

            def pad(seq, value):
                return list(seq) + [value] * (width - len(seq))

            return {"input_ids": torch.tensor([pad(i["input_ids"], tokenizer.pad_token_id) for i in items]),
                    "attention_mask": torch.tensor([pad(i["attention_mask"], 0) for i in items]),
                    "labels": torch.tensor([pad(i["labels"], -100) for i in items])}

        return collate

    def training_loss(self, model, batch):
        loss = model(**batch).loss
        return loss.detach() if self.recipe.task.bug == "detached_loss" else loss

    def evaluation_step(self, model, batch):
        out = model(**batch)
        labels = batch["labels"]
        predictions = out.logits.argmax(-1).masked_fill(labels == -100, -100)  # [batch, this batch's width]
        references = [[int(t) for t in row if t != -100] for row in labels]  # one list per example
        bug = self.recipe.task.bug
        if bug == "wrong_rows":
            predictions = predictions[:1]
        if bug == "typo_key":
            return {"loss": out.loss, "prediction": predictions, "references": references}
        if bug == "not_a_dict":
            return out.loss
        return {"loss": out.loss, "predictions": predictions, "references": references}

    def compute_metrics(self, predictions, references):
        import numpy as np

        assert isinstance(predictions, np.ndarray) and predictions.ndim == 2, type(predictions)
        assert isinstance(references, list) and len(references) == len(predictions)
        correct = total = 0
        for row, ref in zip(predictions, references):
            pred = [int(t) for t in row if t != -100]
            assert len(pred) == len(ref), (pred, ref)  # every word of every example, once
            correct += sum(p == r for p, r in zip(pred, ref))
            total += len(ref)
        return {"token_accuracy": correct / total, "examples": len(references), "tokens": total}

    def predict_input_columns(self):
        return ["tokens"]

    def predict(self, model, tokenizer, records, batch_size=32, stream=False):
        import torch

        rows = []
        for record in records:
            words = record["tokens"] if isinstance(record["tokens"], list) else str(record["tokens"]).split()
            enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
            ids = model(**enc).logits.argmax(-1)[0].tolist()
            tags, seen = [], set()
            for position, word in enumerate(enc.word_ids()):
                if word is not None and word not in seen:
                    seen.add(word)
                    tags.append(TAGS[ids[position]])
            rows.append({**record, "pred_tags": tags})
        if self.recipe.task.bug == "short_predict":
            return rows[:-1]
        return rows


@hookimpl
def finetune_register_tasks(register):
    register(Tagger)


@hookimpl
def finetune_claim_data(probe):
    """`finetune init` on a made-up format: a ``.wtag`` file of JSON lines {"tokens": [...], "tags": [...]}."""
    import json

    from finetune import Claim

    if probe.suffix != ".wtag" or not probe.head_lines:
        return None
    first = json.loads(probe.head_lines[0])
    if not {"tokens", "tags"} <= set(first):
        return None
    return Claim(task="word-tagging", score=0.95, reasons=["a .wtag file: JSON lines of words and their tags"],
                 settings={"data": {"train": probe.path, "max_length": 32}, "train": {"epochs": 1, "batch_size": 8}},
                 comments={"data.train": "word-tagging JSON lines"})
'''


def install_tagger(site: Path) -> Path:
    """The word-tagging plugin installed into ``site`` (distribution ``tagger-dist``, entry point ``tagger``)."""
    return make_dist(site, "tagger-dist", {"tagger": "tagger_plugin"}, {"tagger_plugin": TAGGER})


def tagging_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences of 2-9 words, each word tagged POS, NEG or O (the tiny BERT's vocabulary)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(POSITIVE + NEGATIVE + NEUTRAL) for _ in range(rng.randint(2, 9))]
        tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: A third-party plugin that registers reward functions by name (for the ``grpo`` task): one that works and
#: two that break the contract (an exception; NaN).
REWARDS = '''
from finetune import hookimpl

finetune_hook_version = "1"


def starts_with_digit(completions, examples):
    return [1.0 if text.strip()[:1].isdigit() else 0.0 for text in completions]


def always_raises(completions, examples):
    raise RuntimeError("the scoring service is offline")


def returns_nan(completions, examples):
    return [float("nan")] * len(completions)


@hookimpl
def finetune_register_rewards(register):
    register("starts-with-digit", starts_with_digit, description="1 when the answer starts with a digit")
    register("always-raises", always_raises, description="fails (tests)")
    register("returns-nan", returns_nan, description="NaN (tests)")
'''


def reward_plugin_site(tmp_path: Path) -> Path:
    """A folder to put on PYTHONPATH with the ``reward-dist`` distribution (entry point ``rewards``)."""
    return make_dist(tmp_path / "site", "reward-dist", {"rewards": "reward_plugin"}, {"reward_plugin": REWARDS})
