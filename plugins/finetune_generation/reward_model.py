"""``reward-model``: a scalar reward model (Bradley-Terry) trained on chosen/rejected preference pairs.

The backbone is the causal LM with a sequence-classification head of one output
(``AutoModelForSequenceClassification(num_labels=1)``: SmolLM2 -> ``LlamaForSequenceClassification``); the new
``score`` head trains in full, the transformer with LoRA. A text (a prompt and one answer, rendered as
supervised fine-tuning renders them: chat template, the answer through its end-of-turn token) gets the score
the head gives at its last real token. Training minimises the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected [- margin])``; every evaluation reports ``accuracy`` (share of pairs with
``r_chosen > r_rejected``), ``margin`` (mean ``r_chosen - r_rejected``) and the mean chosen/rejected scores,
also before training (step 0).

Where the score is read: transformers' own pooling takes the rightmost token that is not the pad token, and
the pad token of most causal LMs is their EOS, which is also the last token of every scored text. So the
score is never taken from the model's pooled output: a forward hook on the ``score`` head keeps its output at
every position, and the score of each row is read at the last position its attention mask marks (right or
left padding alike). ``sequence_scores`` does that; training, evaluation, ``predict`` and
:func:`load_reward_scorer` all use it.

A trained run serves as a reward function for GRPO through :func:`load_reward_scorer`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import DataError, DataSplits, RecipeError, Task, attention_projections, quantization_kwargs
from finetune_generation.causal_lm import (
    TemplateOptions,
    apply_chat_template_options,
    shared_prefix_layout,
    shared_prefix_length,
)
from finetune_generation.data import IGNORE, ROLES, Encoder, Example, read_records
from finetune_generation.preference_data import (
    PreferenceData,
    PreferenceExample,
    collate_preferences,
    encode_preference,
    preference_splits,
)

HEAD = "score"


class RewardModelData(PreferenceData):
    completion_column: str = Field("completion", description="`finetune predict` input: field holding the "
                                   "completion to score (text, or chat messages whose last assistant message is "
                                   "the answer); the prompt is in `prompt_column`.")
    label_column: str = Field("label", description="Not used by reward-model (KTO data of the preference tasks).")
    margin_column: str | None = Field(
        None, description="Optional field with a number per pair: how much more the chosen answer is preferred. "
        "The loss becomes -log sigmoid(r_chosen - r_rejected - margin) (Llama 2 style); unset: no margin.")


class RewardModelOptions(TemplateOptions):
    """How texts are rendered before they are scored (as for supervised fine-tuning)."""


# ---------------------------------------------------------------------------
# scores and the loss

def bradley_terry_loss(chosen: Any, rejected: Any, margin: Any = None) -> Any:
    """``mean(-log sigmoid(chosen - rejected - margin))`` over pairs (``margin`` None: 0)."""
    import torch.nn.functional as F

    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def last_token_index(attention_mask: Any) -> Any:
    """The position of each row's last real token: the rightmost position its attention mask marks (works
    for right and left padding; never looks at token ids, so a pad token equal to EOS does no harm)."""
    import torch

    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def score_head(model: Any) -> Any:
    """The ``score`` head of a (PEFT-wrapped, possibly DDP-wrapped) sequence-classification model."""
    inner = getattr(model, "module", model)  # DDP
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(base, HEAD, None)
    if head is None:
        raise RecipeError(f"model.backbone: {type(base).__name__} has no {HEAD!r} head; the reward-model task "
                          "needs a causal LM whose sequence-classification class has one (Llama, Mistral, Qwen2, "
                          "GPT-2, ...).")
    return head


def sequence_scores(model: Any, batch: dict[str, Any]) -> Any:
    """``[rows]`` float scores: the head's output at the last real token of each row of ``batch``
    (``input_ids`` + ``attention_mask``). The forward goes through ``model`` itself (DDP-safe); a hook on the
    head keeps its per-position output.

    The tokens every row starts with (the system prompt and chat header; a pair's prompt too) are computed
    once per batch when ``causal_lm.shared_prefix_length`` finds that exact (no dropout, SDPA attention, not
    DDP-wrapped) and cheaper: the rows become one sequence in which each row attends to the shared prefix
    and to itself, with its own position ids, as ``causal_lm.answer_loss`` does. Same scores up to float
    rounding (a test checks both paths)."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = ids.shape[0]
    prefix = 0
    if hasattr(model, "get_base_model") and "labels" in batch:
        prefix = shared_prefix_length(model, batch)
    if prefix:
        keep, positions, allowed = shared_prefix_layout(mask, prefix)
        inputs = {"input_ids": ids[keep][None], "attention_mask": allowed[None, None],
                  "position_ids": positions[None]}
        last = keep.sum(1).cumsum(0) - 1  # each row's tokens are contiguous; its last one is its last real token
    else:
        inputs = {"input_ids": ids, "attention_mask": mask}
    captured: list[Any] = []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    per_position = captured[-1][..., 0]  # [rows, length], or [1, tokens] with the shared prefix
    if prefix:
        return per_position[0, last.to(per_position.device)].float()
    index = torch.arange(rows, device=per_position.device)
    return per_position[index, last_token_index(mask).to(per_position.device)].float()


def pair_scores(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """``(r_chosen, r_rejected)``, each ``[B]``, of a batch from :func:`collate_preferences` (2B rows)."""
    scores = sequence_scores(model, batch)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


# ---------------------------------------------------------------------------
# the task

class RewardModel(Task):
    name = "reward-model"
    description = ("A reward model: a causal LM with a score head trained on chosen/rejected pairs "
                   "(Bradley-Terry); usable as a GRPO reward.")
    task_options = RewardModelOptions
    data_options = RewardModelData
    default_metric = "eval_loss"
    metric_names = ("accuracy", "margin", "chosen_score", "rejected_score")
    pipeline_tag = "text-classification"
    library_name = "peft"
    quantizable = True  # load_model passes quantization_kwargs (model.quantize) to from_pretrained
    prediction_fields = {"pred_score": "the reward model's score of the prompt + completion (higher is better)"}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self._info: dict[str, Any] = {}
        self.encoder: Encoder | None = None

    # -- data ----------------------------------------------------------
    def prepare_data(self) -> DataSplits:
        splits = preference_splits(self.recipe, unpaired=False, info=self._info)
        self._check_margins(splits)
        return splits

    def _check_margins(self, splits: DataSplits) -> None:
        column = self.recipe.data.margin_column
        if not column:
            return
        for part in (splits.train, splits.eval, splits.test or []):
            for example in part:
                self._margin(example)

    def _margin(self, example: PreferenceExample) -> float:
        import math

        column = self.recipe.data.margin_column
        if not column:
            return 0.0
        value = example.record.get(column)
        number = None
        if not isinstance(value, bool) and isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            shown = "missing" if value is None else repr(value)
            raise DataError(f"data.margin_column: {example.where}: field {column!r} is {shown}; it must hold a "
                            "number (how much more the chosen answer is preferred). Fill it, or unset "
                            "data.margin_column.")
        return number

    def read_examples(self, path: Any, key: str) -> list[PreferenceExample]:
        """Preference pairs (data.test, ``finetune evaluate --input``) of the layout the run trained on."""
        from finetune_generation.preference_data import read_preferences

        data = self.recipe.data
        examples = read_preferences(read_records(str(path), data.format, key), data, key, False)
        if data.margin_column:
            for example in examples:
                self._margin(example)
        return examples

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        encoder = self._encoder(processor)
        max_length = self.recipe.data.max_length
        items, dropped, truncated = [], [], 0
        for i, example in enumerate(examples):
            chosen = encode_scored(encoder, example.prompt, example.chosen, max_length)
            rejected = encode_scored(encoder, example.prompt, example.rejected, max_length)
            if chosen is None or rejected is None:
                dropped.append(example.where)
                continue
            truncated += chosen[1] or rejected[1]
            items.append({"index": i, "chosen_input_ids": chosen[0], "chosen_labels": chosen[2],
                          "rejected_input_ids": rejected[0], "rejected_labels": rejected[2],
                          "margin": self._margin(example)})
        split = "train" if training else "eval"
        self._info[f"{split}_truncated"] = truncated
        if dropped:
            self._info[f"{split}_dropped"] = len(dropped)
        if truncated or dropped:
            print(f"warning: {truncated} of {len(examples)} {split} pairs have an answer cut at data.max_length = "
                  f"{max_length} tokens (scored at the last kept token)"
                  + (f"; {len(dropped)} lose a whole answer and are left out (e.g. {dropped[0]})" if dropped else "")
                  + ". Raise data.max_length to keep them whole.", file=sys.stderr)
        if not items:
            raise DataError(f"data.max_length: all {len(examples)} {split} pairs lose a whole answer when cut to "
                            f"{max_length} tokens (e.g. {dropped[0]}); raise data.max_length.")
        return items

    def collate_fn(self, processor: Any):
        pad_id = processor.pad_token_id

        def fn(items: list[dict[str, Any]]) -> dict[str, Any]:
            import torch

            batch = collate_preferences([{k: v for k, v in x.items() if k != "margin"} for x in items], pad_id)
            batch["margin"] = torch.tensor([float(x["margin"]) for x in items], dtype=torch.float32)
            return batch

        return fn

    def example_lengths(self, dataset: Any) -> list[int]:
        return [max(len(x["chosen_input_ids"]), len(x["rejected_input_ids"])) for x in dataset]

    def _encoder(self, processor: Any) -> Encoder:
        if self.encoder is None or self.encoder.tokenizer is not processor:
            if processor.eos_token_id is None:
                raise RecipeError("model.backbone: the tokenizer has no EOS token to end an answer with; use a "
                                  "backbone whose tokenizer defines eos_token.")
            self.encoder = Encoder(tokenizer=processor, use_template=bool(getattr(processor, "chat_template", None)),
                                   stop_ids=[processor.eos_token_id], system_prompt=self.recipe.task.system_prompt)
        return self.encoder

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        apply_chat_template_options(tokenizer, self.recipe.task)
        if tokenizer.pad_token is None:
            # scores are read at positions from the attention mask, never by token id: reusing EOS is safe
            tokenizer.pad_token = tokenizer.eos_token
        dtype = "auto" if torch.cuda.is_available() else torch.float32
        load = {"dtype": dtype, **quantization_kwargs(self.recipe)}  # model.quantize (QLoRA); {} when "none"
        model = _quietly(lambda: AutoModelForSequenceClassification.from_pretrained(
            backbone.path, num_labels=1, **load, **kwargs))
        model.config.pad_token_id = tokenizer.pad_token_id  # batches of more than one row need it set
        self.encoder = None
        self._encoder(tokenizer)  # fail early without an EOS token
        return model, tokenizer

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        score_head(model)  # a clear error when the model has none
        return [HEAD]

    def peft_task_type(self) -> str:
        return "SEQ_CLS"

    # -- training and evaluation ---------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        chosen, rejected = pair_scores(model, batch)
        return bradley_terry_loss(chosen, rejected, batch["margin"] if self.recipe.data.margin_column else None)

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        chosen, rejected = pair_scores(model, batch)
        margin = batch["margin"] if self.recipe.data.margin_column else None
        return {"loss": bradley_terry_loss(chosen, rejected, margin),
                "predictions": torch.stack([chosen, rejected], dim=1), "references": batch["margin"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        import numpy as np

        scores = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
        diff = scores[:, 0] - scores[:, 1]
        return {"accuracy": float((diff > 0).mean()), "margin": float(diff.mean()),
                "chosen_score": float(scores[:, 0].mean()), "rejected_score": float(scores[:, 1].mean())}

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        metrics.setdefault("data", {}).update({k: v for k, v in self._info.items()
                                               if k.endswith(("_truncated", "_dropped"))})

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.prompt_column, self.recipe.data.completion_column]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """Records with a prompt (text or chat messages ending with a user turn) and a completion (text, or
        messages whose last assistant message is the answer): a table or JSONL file."""
        from finetune import missing_input_column

        records = [rec for _, rec in read_records(str(path), "auto", "--input")]
        if not records:
            raise DataError(f"--input: {path} holds no records.")
        for i, rec in enumerate(records):
            for column in self.predict_input_columns():
                if rec.get(column) is None:
                    raise missing_input_column(f"{path}: record {i + 1}", column, list(rec), self.recipe.data)
        return records

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        data = self.recipe.data
        prompts, answers = [], []
        for i, rec in enumerate(records):
            where = f"--input: record {i + 1}"
            if rec.get(data.completion_column) is None:
                raise DataError(f"{where} has no {data.completion_column!r} field (data.completion_column): a reward "
                                "model scores a prompt and a completion. Give both in a file: finetune predict RUN "
                                f"--input FILE.jsonl with {data.prompt_column!r} and {data.completion_column!r}.")
            prompts.append(_prompt_example(rec.get(data.prompt_column), data.prompt_column, where))
            answers.append(_answer_text(rec[data.completion_column], data.completion_column, where))
        scores = self.score(model, processor, prompts, answers, batch_size=batch_size)
        return [{**r, "pred_score": s} for r, s in zip(records, scores)]

    def score(self, model: Any, processor: Any, prompts: list[Example | str], answers: list[str],
              batch_size: int = 16) -> list[float]:
        """Scores of ``answers`` to ``prompts`` (an :class:`Example`, or a prompt text sent as one user turn),
        rendered as in training, in batches of similar length, without gradients. ``model`` in eval mode."""
        import torch

        from finetune_generation.data import collate

        encoder = self._encoder(processor)
        max_length = self.recipe.data.max_length
        rows = []
        for prompt, answer in zip(prompts, answers):
            if isinstance(prompt, str):
                prompt = Example(where="input", prompt=prompt, plain_prompt=prompt)
            encoded = encode_scored(encoder, prompt, str(answer), max_length)
            if encoded is None:  # the prompt alone fills max_length: score the cut text as it is
                ids = encoder.prompt_ids(prompt)[:max_length]
                rows.append({"input_ids": ids, "labels": [IGNORE] * len(ids)})
            else:
                rows.append({"input_ids": encoded[0], "labels": encoded[2]})
        device = next(model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        out = [0.0] * len(rows)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                # labels mark the answers: the prompt tokens all rows share are computed once (sequence_scores)
                batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], processor.pad_token_id).items()}
                for i, value in zip(chunk, sequence_scores(model, batch).tolist()):
                    out[i] = float(value)
        return out

    def usage_snippet(self, base: str) -> str:
        template = self.encoder.use_template if self.encoder is not None else True
        system = self.recipe.task.system_prompt
        if template:
            turns = ([f"{{'role': 'system', 'content': {system!r}}}, "] if system else []) + [
                "{'role': 'user', 'content': prompt}"]
            render = ("# rendered as in training: the prompt as a user turn, then the answer and its end token\n"
                      f"ids = tokenizer.apply_chat_template([{''.join(turns)}], add_generation_prompt=True)\n"
                      "ids = list(getattr(ids, 'input_ids', ids))\n")
        else:
            render = ("# rendered as in training: prompt, answer, end token\n"
                      "ids = tokenizer(prompt)['input_ids']\n")
        return (
            "import torch\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')  # the run's adapter/ folder\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
            "# one text at a time, unpadded: no pad token, so the score is read at the very last token (the\n"
            "# answer's end token, as in training; with pad = EOS transformers would skip that token)\n"
            "base.config.pad_token_id = None\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # LoRA + the trained score head\n"
            "prompt, answer = 'your prompt', 'an answer to score'\n"
            + render +
            "ids += tokenizer(answer, add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]\n"
            "with torch.no_grad():\n"
            "    print(model(input_ids=torch.tensor([ids])).logits.item())  # the score: higher is better\n")


def _prompt_example(value: Any, column: str, where: str) -> Example:
    """A prediction record's prompt: text, or chat messages ending with a user turn."""
    if isinstance(value, list):
        ok = all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
        if not ok or not value or value[-1]["role"] != "user":
            raise DataError(f"{where}: field {column!r} holds a list that is not chat messages ending with a user "
                            "turn ([{\"role\": \"user\", \"content\": ...}]); give the prompt as text or as such "
                            "messages.")
        return Example(where=where, messages=[{"role": m["role"], "content": m["content"]} for m in value])
    if value is None or isinstance(value, (dict, bool)):
        raise DataError(f"{where}: field {column!r} must hold the prompt (text or chat messages), got "
                        f"{type(value).__name__}.")
    return Example(where=where, prompt=str(value), plain_prompt=str(value))


def _answer_text(value: Any, column: str, where: str) -> str:
    """A prediction record's completion: text, or chat messages (the last assistant message)."""
    if isinstance(value, list):
        answers = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        if not answers or not isinstance(answers[-1], str):
            raise DataError(f"{where}: field {column!r} holds a list without an assistant message; give the "
                            "completion as text or as chat messages ending with the assistant's answer.")
        return answers[-1]
    if isinstance(value, (dict, bool)):
        raise DataError(f"{where}: field {column!r} must hold the completion as text, got {type(value).__name__}.")
    return str(value)


def encode_scored(encoder: Encoder, prompt: Example, answer: str,
                  max_length: int) -> tuple[list[int], bool, list[int]] | None:
    """``(input_ids, truncated, labels)`` of the text a reward model scores: the prompt and the answer
    through its end-of-turn token, rendered as :func:`encode_preference` renders them, without what a chat
    template adds after the end token (its score is read at the last token). None: no answer token left."""
    full = encode_preference(encoder, prompt, answer, 1 << 30)
    if full is None:
        return None
    ids, labels = full
    end = max(i for i, t in enumerate(labels) if t != IGNORE) + 1
    ids, labels = ids[:end], labels[:end]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE for t in labels):
            return None
    return ids, truncated, labels


def _quietly(load: Callable[[], Any]) -> Any:
    """transformers' load report lists the new ``score`` head as newly initialised: expected here."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load()
    finally:
        logging.set_verbosity(level)


# ---------------------------------------------------------------------------
# a trained reward model as a GRPO reward

def load_reward_scorer(run_path: str, batch_size: int = 16,
                       device: str | None = None) -> Callable[[list[str], list[dict[str, Any]]], list[float]]:
    """A reward function ``(completions, examples) -> scores`` from a finished ``reward-model`` run folder.

    The run is loaded with :func:`finetune.load_run` (its best adapter and score head, eval mode) and moved to
    ``device`` (default: CUDA when available, else CPU). Each completion is scored with its example's
    ``"prompt"`` (the prompt text, as :mod:`finetune.contract.rewards` passes it: sent as one user turn,
    through the run's chat template and system prompt), rendered as in training, in batches of
    ``batch_size``, without gradients. Scores are the model's raw outputs (higher is better; their scale is
    the Bradley-Terry logit: a difference of 1 means odds of e:1 that the first answer is preferred)."""
    import torch

    from finetune import load_run

    task, model, processor, _ = load_run(run_path)
    scorer_task = getattr(task, "task", task)  # the plugin's own object inside the core's guard
    if not isinstance(scorer_task, RewardModel):
        raise RecipeError(f"{run_path}: is a {task.name!r} run, not a {RewardModel.name!r} run; a reward model "
                          "scorer needs a run trained with [task] name = \"reward-model\".")
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()

    def score(completions: list[str], examples: list[dict[str, Any]]) -> list[float]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        prompts = [str(ex.get("prompt") or "") for ex in examples]
        return scorer_task.score(model, processor, prompts, list(completions), batch_size=batch_size)

    score.__doc__ = f"The reward model of {run_path}: one score per completion (higher is better)."
    return score


__all__ = ["RewardModel", "RewardModelData", "RewardModelOptions", "bradley_terry_loss", "encode_scored",
           "last_token_index", "load_reward_scorer", "sequence_scores"]
