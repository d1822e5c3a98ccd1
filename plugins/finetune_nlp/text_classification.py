"""``text-classification``: sequence classification on any transformers encoder.

Data: a table with a text column (and optionally a second text column for
pairs) and a label column holding strings or integers. Metrics: accuracy,
macro-F1 and a per-class report. Baseline: character n-gram TF-IDF +
logistic regression on the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    PathStr,
    TaskOptions,
    label_text,
    load_table,
    open_dataset,
    require_columns,
    sorted_labels,
    split_frame,
)
from finetune_nlp.text_shared import (
    EncodedDataset,
    EncoderClassifier,
    check_not_empty,
    is_integer,
    label_counts,
    mistakes_first,
    row_locations,
)


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
    baseline: bool = Field(True, description="Also score a TF-IDF + logistic regression baseline on the split. On "
                           "bigger tables it fits and scores on a seeded sample of 50,000 train and 50,000 eval rows "
                           "(said on stderr).")
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
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="What the classifier reads: 'cls', the first token of the last layer (through the "
        "backbone's pooler where it has one); 'mean', the mean of the last layer over the real tokens, the "
        "sentence embedding that sentence-transformers backbones (all-MiniLM-L6-v2, ...) were trained to produce: "
        "much better with few examples per class (measured for text-classification: benchmarks/fewshot_text.py). "
        "'mean' turns last_layer_cls_only off (and cannot be combined with cache_frozen_layers); it works through "
        "hooks added when the task loads the model (training, predict, load_run). Plain transformers reads the "
        "first token, so the model card's usage snippet writes the same hooks out in plain torch.")


class TextClassification(EncoderClassifier):
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
        return self._check(df, key, str(path), lambda rows: row_locations(path, self.recipe.data.format, rows))

    def _check(self, df: Any, key: str, where: str, locations: Any):
        """Columns present, no empty text or label (naming rows via ``locations``), labels as strings."""
        data = self.recipe.data
        require_columns(df, {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column,
                             "data.label_column": data.label_column,
                             "data.group_column": data.group_column}, where)
        check_not_empty(df, data.label_column, "data.label_column", key, where, locations)
        self.check_texts(df, key, where, locations)
        df[data.label_column] = df[data.label_column].map(label_text)
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
        integer = all(is_integer(label) for label in labels)
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
        import pandas as pd

        enc = self.encode(examples, processor)
        codes = pd.Categorical(examples[data.label_column], categories=self.state["labels"]).codes  # vectorised
        if (codes < 0).any():  # a label unseen in training (checked earlier): say which, as before
            label_ids = {label: i for i, label in enumerate(self.state["labels"])}
            codes = [label_ids[v] for v in examples[data.label_column]]
        labels = [int(c) for c in codes] if isinstance(codes, list) else codes.tolist()
        return EncodedDataset(enc, labels, self.example_ids(len(labels), training))

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.forward(model, batch)
        return {"loss": out.loss, "predictions": out.logits.argmax(-1), "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

        labels = self.state["labels"]
        ids = list(range(len(labels)))
        p, r, f, s = precision_recall_fscore_support(references, predictions, labels=ids, zero_division=0)
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=ids, average="macro", zero_division=0)),
            "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                      "support": int(s[i])} for i in ids},
            "confusion_matrix": confusion_matrix(references, predictions, labels=ids).tolist(),
        }

    # -- the run report ------------------------------------------------
    def data_summary(self, splits: DataSplits) -> dict[str, Any]:
        return {"label_counts": label_counts(splits, self.recipe.data.label_column, self.state["labels"])}

    def report_samples(self, model: Any, processor: Any, examples: Any, run_path: Path,
                       limit: int) -> list[dict[str, Any]]:
        """The first eval rows predicted, mistakes first: of the first ``5 * limit`` rows, up to half the
        samples are wrong ones (in data order), the rest right ones."""
        data = self.recipe.data
        pool = examples.head(5 * limit)
        columns = [c for c in (data.text_column, data.text_pair_column) if c]
        records = pool[columns].to_dict(orient="records")
        predicted = self.predict(model, processor, records, batch_size=32)
        rows = []
        for record, pred, reference in zip(records, predicted, pool[data.label_column]):
            text = str(record[data.text_column])
            if data.text_pair_column:
                text += f"  ||  {record[data.text_pair_column]}"
            rows.append({"input": text, "reference": str(reference), "prediction": str(pred["pred_label"]),
                         "correct": str(pred["pred_label"]) == str(reference), "score": float(pred["pred_score"])})
        return mistakes_first(rows, limit)

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
        from sklearn.pipeline import make_pipeline

        splits = self.baseline_splits(splits)
        data = self.recipe.data
        texts = self.baseline_texts
        clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                            LogisticRegression(max_iter=2000, C=10.0))
        clf.fit(texts(splits.train), splits.train[data.label_column])
        pred = clf.predict(texts(splits.eval))
        ref = splits.eval[data.label_column]
        return {"name": "char n-gram TF-IDF + logistic regression",
                "accuracy": float(accuracy_score(ref, pred)),
                "macro_f1": float(f1_score(ref, pred, average="macro"))}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        labels = self.state["labels"]
        rows = []
        probs = torch.softmax(self.batched_logits(model, processor, records, batch_size), dim=-1)
        for record, p in zip(records, probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
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
            f"{self.pooling_snippet()}"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "logits = model(**tokenizer(['some text'], return_tensors='pt')).logits\n"
            "print(labels[logits.argmax(-1).item()])")
