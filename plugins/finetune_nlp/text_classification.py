"""``text-classification``: sequence classification on any transformers encoder.

Data: a table with a text column (and optionally a second text column for
pairs) and a label column holding strings or integers. Metrics: accuracy,
macro-F1 and a per-class report. Baseline: character n-gram TF-IDF +
logistic regression on the same split.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    PathStr,
    RecipeError,
    Task,
    TaskOptions,
    attention_projections,
    label_text,
    load_table,
    open_dataset,
    require_columns,
    sorted_labels,
    split_frame,
)
from finetune_nlp.prefix_cache import FrozenPrefixCache

_HEAD_NAMES = ("classifier", "score", "pre_classifier", "pooler")


class TextClassificationData(DataOptions):
    train: PathStr | None = Field(None, description="Training table: a .csv, .tsv, .jsonl, .json or .parquet file "
                                  "with `text_column` and `label_column` (or give `dataset`).")
    eval: PathStr | None = Field(None, description="Evaluation table with the same columns; if absent, `split` of "
                                 "train is held out (each label keeps its share; `group_column` keeps groups whole).")
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs).")
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    max_length: int = Field(128, gt=0, le=8192, description="Truncate texts to this many tokens.")


class TextClassificationOptions(TaskOptions):
    baseline: bool = Field(True, description="Also score a TF-IDF + logistic regression baseline on the split.")
    cache_frozen_layers: bool = Field(
        False, description="With LoRA only in the top layers (peft.layers), compute the frozen layers below once "
        "per example and reuse their output every epoch: much faster. Those layers then run without dropout, "
        "which changes results slightly.")
    last_layer_cls_only: bool = Field(
        True, description="The classifier reads only the first token ([CLS]) of the last layer, so compute that "
        "layer's query, attention output and feed-forward block for that token only (keys and values still for "
        "every token): the same outputs and gradients, a seventh less work on a 6-layer encoder. Applied to "
        "BERT-style layers (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM) after a check on a probe batch that the head "
        "reads only that token. That layer's dropout then draws fewer random numbers, so dropout masks differ "
        "from a run without it.")


class TextClassification(Task):
    name = "text-classification"
    description = "Classify texts (or text pairs) into labels with a transformers encoder."
    task_options = TextClassificationOptions
    data_options = TextClassificationData
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1")
    pipeline_tag = "text-classification"
    library_name = "peft"
    prediction_fields = {"pred_label": "the most likely label",
                         "pred_score": "its probability",
                         "prob_<label>": "the probability of each label"}

    # -- data ----------------------------------------------------------
    def _read(self, path: str, key: str):
        df = load_table(path, self.recipe.data.format, key=key)
        return self._check(df, key, str(path), lambda rows: _row_locations(path, self.recipe.data.format, rows))

    def _check(self, df: Any, key: str, where: str, locations: Any):
        """Columns present, no empty text or label (naming rows via ``locations``), labels as strings."""
        data = self.recipe.data
        require_columns(df, {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column,
                             "data.label_column": data.label_column,
                             "data.group_column": data.group_column}, where)
        for column, ckey in ((data.text_column, "data.text_column"), (data.label_column, "data.label_column")):
            values = df[column]
            empty = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
            bad = [i for i, is_empty in enumerate(empty.tolist()) if is_empty]  # positions, not index labels
            if bad:
                raise DataError(f"{key}: {where}: {len(bad)} row(s) have an empty {ckey} ({column!r}), e.g. on "
                                f"{locations(bad[:5])}; fill or remove them.")
        df[data.label_column] = df[data.label_column].map(label_text)
        df[data.text_column] = df[data.text_column].astype(str)
        return df

    def _from_dataset(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        """Train, eval (None: hold out) and test (None: none) tables from data.dataset (a Hub or local data
        set), and where they came from."""
        data = self.recipe.data
        source = open_dataset(data, self.recipe.source.parent if self.recipe.source else None)
        train, eval_ = source.train_and_eval(data)
        tables = [None if split is None else
                  self._check(split.frame(), key, split.where,
                              lambda rows: "row(s) " + ", ".join(str(i + 1) for i in rows))
                  for split, key in ((train, "data.dataset_split"), (eval_, "data.dataset_eval_split"),
                                     (source.test_split(data), "data.dataset_test_split"))]
        return *tables, source.info

    def read_examples(self, path: Path, key: str) -> Any:
        """A labelled table (data.test, ``finetune evaluate --input``): columns as in training, labels known."""
        df = self._read(path, key)
        self._check_labels(df, key, path, self.state["labels"])
        return df

    def _check_labels(self, df: Any, key: str, where: Any, labels: list[str]) -> None:
        unseen = sorted_labels(set(df[self.recipe.data.label_column]) - set(labels))
        if unseen:
            raise DataError(f"{key}: labels {unseen} appear in {where} but never in training (training labels: "
                            f"{labels}); add training examples for them or drop those rows.")

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        train, eval_, test, provenance = self._from_dataset() if data.dataset else \
            (self._read(data.train, "data.train"), None, None, {})
        if data.test_split:  # held out first, so the test rows never depend on the eval settings
            train, test = split_frame(train, data.test_split, self.recipe.train.seed, stratify=data.label_column,
                                      group=data.group_column, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=self.recipe.train.seed) \
                .reset_index(drop=True)
        if eval_ is None and data.eval:
            eval_ = self._read(data.eval, "data.eval")
        if eval_ is None:
            train, eval_ = split_frame(train, data.split, self.recipe.train.seed, stratify=data.label_column,
                                       group=data.group_column)
        labels = sorted_labels(train[data.label_column])
        if len(labels) < 2:
            raise DataError(f"data.label_column: only one class ({labels[0]!r}) in the training data "
                            f"({data.train or data.dataset}); classification needs at least two.")
        self._check_labels(eval_, "data.eval", f"the eval data ({data.eval or data.dataset})", labels)
        # Labels are handled as strings; remember integer labels so predictions give them back as integers.
        integer = all(_is_integer(label) for label in labels)
        self.state = {"labels": labels, "integer_labels": integer}
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        elif test is not None:
            self._check_labels(test, "data.test_split" if data.test_split else "data.dataset_test_split",
                               "the test split", labels)
        counts = train[data.label_column].value_counts().to_dict()
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}), "labels": labels,
                "train_label_counts": {k: int(counts[k]) for k in labels}, **provenance}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        data = self.recipe.data
        label_ids = {label: i for i, label in enumerate(self.state["labels"])}
        texts = examples[data.text_column].tolist()
        pairs = examples[data.text_pair_column].astype(str).tolist() if data.text_pair_column else None
        enc = processor(texts, pairs, truncation=True, max_length=data.max_length)
        labels = [label_ids[v] for v in examples[data.label_column]]
        # With the frozen-prefix cache every example carries an id: i for training, -1 - i for eval.
        ids = None
        if self.recipe.task.cache_frozen_layers:
            ids = list(range(len(labels))) if training else [-1 - i for i in range(len(labels))]
        return _EncodedDataset(enc, labels, ids)

    def example_lengths(self, dataset: Any) -> list[int]:
        return [len(ids) for ids in dataset.encodings["input_ids"]]

    def collate_fn(self, processor: Any):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor, return_tensors="pt")

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        labels = self.state["labels"]
        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.recipe.task.cache_frozen_layers:
            self._first_trainable = self._check_prefix_cache(model, tokenizer)
        self._last_layer_shortened = self.recipe.task.last_layer_cls_only and self._shorten_last_layer(model, tokenizer)
        from finetune_nlp.bert_layers import explicit_attention

        explicit_attention(model)  # applies train.fast_dropout's dropout modules inside attention too
        return model, tokenizer

    def _shorten_last_layer(self, model: Any, tokenizer: Any) -> bool:
        """task.last_layer_cls_only (finetune_nlp.bert_layers), checked on a padded probe batch."""
        from finetune_nlp.bert_layers import last_layer, shorten_last_layer

        if last_layer(model) is None:
            return False  # not a BERT-style layer: nothing to shorten, nothing changes
        probe = tokenizer(["the last layer is checked on this probe text", "a short one"], padding=True,
                          truncation=True, max_length=self.recipe.data.max_length, return_tensors="pt")
        shortened, why = shorten_last_layer(model, lambda: model(**probe).logits)
        if not shortened:
            print(f"warning: task.last_layer_cls_only: {why}, so the last layer computes every token (slower, "
                  "same results); set it to false to silence this", file=sys.stderr)
        return shortened

    def _check_prefix_cache(self, model: Any, tokenizer: Any) -> int:
        """The lowest LoRA layer, after checking the cache can be exact (before the run folder exists)."""
        from finetune import resolve_layers

        peft = self.recipe.peft
        if peft.method != "lora" or peft.layers is None:
            raise RecipeError("task.cache_frozen_layers needs LoRA in the top layers only: set peft.method = "
                              "\"lora\" and peft.layers (e.g. [-2, -1]), or set task.cache_frozen_layers = false.")
        _, layers = resolve_layers(model, peft.layers)
        if layers[0] == 0:
            raise RecipeError(f"task.cache_frozen_layers: peft.layers {peft.layers} includes layer 0, so no layer "
                              "is frozen below LoRA; use the top layers (e.g. [-2, -1]) or turn the cache off.")
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise RecipeError("task.cache_frozen_layers needs a tokenizer that pads on the right; turn the cache off.")
        return layers[0]

    def speed_notes(self) -> list[str]:
        notes = []
        if getattr(self, "_last_layer_shortened", False):
            notes.append("task.last_layer_cls_only: the last layer computes only the first token, the one the "
                         "classifier reads: faster; results equal within rounding, except that dropout there draws "
                         "other random values (set it to false to compute every token)")
        if self.recipe.task.cache_frozen_layers:
            notes.append("task.cache_frozen_layers: the frozen layers below peft.layers run once per example and "
                         "their output is reused every epoch, with no dropout there: much faster; results differ "
                         "slightly from training without the cache (set it to false to run every layer every time)")
        return notes

    def _prefix(self, model: Any) -> FrozenPrefixCache | None:
        if not self.recipe.task.cache_frozen_layers:
            return None
        cache = getattr(self, "_prefix_cache", None)
        if cache is None:
            first = getattr(self, "_first_trainable", None)
            if first is None:
                from finetune import resolve_layers

                first = resolve_layers(model, self.recipe.peft.layers)[1][0]
            cache = self._prefix_cache = FrozenPrefixCache(model, first)
        return cache

    def train_mode(self, model: Any) -> None:
        cache = self._prefix(model)
        if cache is None:
            model.train()
        else:
            cache.train_mode(model)

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        cache = self._prefix(model)
        return (cache.forward(model, batch) if cache is not None else model(**batch)).loss

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        # The head, and the pooler in front of it: all-MiniLM-L6-v2 was trained with mean pooling, so its
        # CLS pooler is effectively untrained and must learn too.
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return [n for n in _HEAD_NAMES if n in names]

    def peft_task_type(self) -> str:
        return "SEQ_CLS"

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        cache = self._prefix(model)
        out = cache.forward(model, batch) if cache is not None else model(**batch)
        return {"loss": out.loss, "predictions": out.logits.argmax(-1), "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

        labels = self.state["labels"]
        ids = list(range(len(labels)))
        p, r, f, s = precision_recall_fscore_support(references, predictions, labels=ids, zero_division=0)
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=ids, average="macro", zero_division=0)),
            "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                      "support": int(s[i])} for i in ids},
        }

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
        from sklearn.pipeline import make_pipeline

        data = self.recipe.data

        def texts(df):
            if data.text_pair_column:
                return (df[data.text_column] + " [SEP] " + df[data.text_pair_column].astype(str)).tolist()
            return df[data.text_column].tolist()

        clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                            LogisticRegression(max_iter=2000, C=10.0))
        clf.fit(texts(splits.train), splits.train[data.label_column])
        pred = clf.predict(texts(splits.eval))
        ref = splits.eval[data.label_column]
        return {"name": "char n-gram TF-IDF + logistic regression",
                "accuracy": float(accuracy_score(ref, pred)),
                "macro_f1": float(f1_score(ref, pred, average="macro"))}

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        data = self.recipe.data
        return [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        data = self.recipe.data
        labels = self.state["labels"]
        rows = []
        device = next(model.parameters()).device
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            texts = [str(r[data.text_column]) for r in chunk]
            pairs = [str(r[data.text_pair_column]) for r in chunk] if data.text_pair_column else None
            enc = processor(texts, pairs, truncation=True, max_length=data.max_length, padding=True,
                            return_tensors="pt").to(device)
            probs = torch.softmax(model(**enc).logits.float(), dim=-1).cpu()
            for record, p in zip(chunk, probs):
                best = int(p.argmax())
                label = int(labels[best]) if self.state.get("integer_labels") else labels[best]
                rows.append({**record, "pred_label": label, "pred_score": float(p[best]),
                             **{f"prob_{name}": float(p[i]) for i, name in enumerate(labels)}})
        return rows

    def usage_snippet(self, base: str) -> str:
        labels = self.state.get("labels", [])
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"labels = {labels!r}\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=len(labels))\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "logits = model(**tokenizer(['some text'], return_tensors='pt')).logits\n"
            "print(labels[logits.argmax(-1).item()])")


class _EncodedDataset:
    def __init__(self, encodings: Any, labels: list[int], ids: list[int] | None = None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.ids = ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        if self.ids is not None:
            item[FrozenPrefixCache.ID_KEY] = self.ids[i]
        return item


def _row_locations(path: str, fmt: str, positions: list[int]) -> str:
    """'line(s) 3, 7' for text formats (csv/tsv: after the header line), else 'row(s) 1, 5' (1-based)."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    kind = fmt if fmt != "auto" else {"ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if kind in ("csv", "tsv"):
        return "line(s) " + ", ".join(str(i + 2) for i in positions)  # +2: header line, 1-based
    if kind == "jsonl":
        return "line(s) " + ", ".join(str(i + 1) for i in positions)
    return "row(s) " + ", ".join(str(i + 1) for i in positions)


def _is_integer(label: str) -> bool:
    return label.lstrip("-").isdigit()
