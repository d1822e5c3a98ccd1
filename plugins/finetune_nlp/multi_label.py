"""``multi-label-classification``: each text (or text pair) gets any number of labels, none included.

Data: a table with a text column (and optionally a second text column for pairs) and a label column
holding, per row, a list of labels (a JSON list in .jsonl, or a JSON list written as text in a .csv) or
a string of labels separated by ``data.label_delimiter`` (``"sports,politics"``); ``[]`` is a row with
no label. Model: a sequence-classification head with one sigmoid output per label, trained with binary
cross-entropy. Each label's decision threshold is tuned on the eval split at every evaluation (the
value, on a 0.05..0.95 grid, that maximises that label's F1); the thresholds of the selected checkpoint
are saved with its adapter and used by ``predict``, ``finetune evaluate`` and the test split. Metrics:
micro-F1 (selects the checkpoint), macro-F1, subset accuracy (every label right), mAP (mean per-label
average precision, threshold-free), the same three at a fixed 0.5 threshold (``*_at05``: not tuned on
the data they score), and a per-label report. The label parsing, threshold tuning and metrics are the
core's (``finetune.parse_labels``, ``thresholded_report``, ``multilabel_report``), shared with the vision
plugin's ``multi-label-image-classification``. Baseline:
word and bigram TF-IDF + one-vs-rest logistic regression on the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    PathStr,
    load_table,
    multi_hot,
    multilabel_metrics,
    parse_labels,
    require_columns,
    selected_thresholds,
    sorted_labels,
    thresholded_report,
)
from finetune_nlp.text_classification import TextClassificationOptions
from finetune_nlp.text_shared import EncodedDataset, EncoderClassifier, is_integer, row_locations, table_splits


class MultiLabelData(DataOptions):
    train: PathStr | None = Field(None, description="Training table: a .csv, .tsv, .jsonl, .json or .parquet file "
                                  "with `text_column` and `label_column` (or give `dataset`: a data set whose label "
                                  "column holds lists of labels or of ClassLabel ids, e.g. go_emotions).")
    eval: PathStr | None = Field(None, description="Evaluation table with the same columns; if absent, `split` of "
                                 "train is held out at random (`group_column` keeps groups whole). It also tunes "
                                 "each label's threshold.")
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs).")
    label_column: str = Field("labels", description="Column holding each row's labels: a list (JSON lines), a JSON "
                              "list written as text (`[\"a\", \"b\"]`, `[]` for none), or labels separated by "
                              "`label_delimiter` (`a,b`).")
    label_delimiter: str = Field(",", min_length=1, description="Separates the labels of a row written as one "
                                 "string (`sports,politics`); spaces around each label are ignored.")
    max_length: int = Field(128, gt=0, le=8192, description="Truncate texts to this many tokens.")


class MultiLabelOptions(TextClassificationOptions):
    baseline: bool = Field(True, description="Also score a TF-IDF + one-vs-rest logistic regression baseline on "
                           "the split. On bigger tables it fits and scores on a seeded sample of 50,000 train "
                           "and 50,000 eval rows (said on stderr).")


class MultiLabelClassification(EncoderClassifier):
    name = "multi-label-classification"
    description = "Tag texts (or text pairs) with any number of labels (sigmoid outputs, tuned thresholds)."
    task_options = MultiLabelOptions
    data_options = MultiLabelData
    default_metric = "micro_f1"
    metric_names = ("micro_f1", "macro_f1", "subset_accuracy", "map", "micro_f1_at05", "macro_f1_at05",
                    "subset_accuracy_at05")
    pipeline_tag = "text-classification"
    library_name = "peft"
    prediction_fields = {"pred_labels": "the labels whose probability reaches their tuned threshold (a list)",
                         "prob_<label>": "the probability of each label"}

    # -- data ----------------------------------------------------------
    def _read(self, path: str | Path, key: str) -> Any:
        data = self.recipe.data
        df = load_table(path, data.format, key=key)
        return self._checked(df, key, str(path), lambda rows: row_locations(path, data.format, rows))

    def _read_split(self, split: Any, key: str) -> Any:
        """A data set split (``finetune.open_dataset``); a list-of-ClassLabel label column (as in go_emotions)
        is read as label names."""
        return self._checked(split.frame(), key, split.where, _row_numbers)

    def _checked(self, df: Any, key: str, where: str, locations: Any) -> Any:
        """Columns present, no empty text, each row's labels parsed into a list (errors name ``where`` and rows)."""
        data = self.recipe.data
        require_columns(df, {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column,
                             "data.label_column": data.label_column, "data.group_column": data.group_column},
                        where)
        self.check_texts(df, key, where, locations)
        parsed = []
        for i, value in enumerate(df[data.label_column].tolist()):
            try:
                parsed.append(parse_labels(value, data.label_delimiter))
            except ValueError as exc:
                raise DataError(f"{key}: {where}: data.label_column ({data.label_column!r}) on {locations([i])}: "
                                f"{exc}") from None
        df[data.label_column] = parsed
        return df

    def read_examples(self, path: Path, key: str) -> Any:
        """A labelled table (data.test, ``finetune evaluate --input``): columns as in training, labels known."""
        df = self._read(path, key)
        self._check_labels(df, key, str(path), self.state["labels"],
                           lambda rows: row_locations(path, self.recipe.data.format, rows))
        return df

    def _check_labels(self, df: Any, key: str, where: str, labels: list[str], locations: Any) -> None:
        known = set(labels)
        rows = [i for i, row in enumerate(df[self.recipe.data.label_column].tolist()) if set(row) - known]
        if rows:
            unseen = sorted_labels({x for row in df[self.recipe.data.label_column] for x in row} - known)
            raise DataError(f"{key}: labels {unseen} appear in {where} (e.g. on {locations(rows[:5])}) but never "
                            f"in training (training labels: {labels}); add training examples for them or drop "
                            "those rows.")

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        train, eval_, test, train_where, provenance = table_splits(self, self._read, self._read_split)
        labels = sorted_labels(x for row in train[data.label_column] for x in row)
        if not labels:
            raise DataError(f"data.label_column: no row of the training data ({train_where}) has a label "
                            f"({data.label_column!r}); multi-label classification needs at least one label.")
        if data.eval:
            self._check_labels(eval_, "data.eval", str(data.eval), labels,
                               lambda rows: row_locations(data.eval, data.format, rows))
        elif data.dataset_eval_split:
            self._check_labels(eval_, "data.dataset_eval_split", f"{data.dataset}[{data.dataset_eval_split}]", labels,
                               _row_numbers)
        else:
            self._check_labels(eval_, "data.split", f"the eval rows held out from {train_where}", labels,
                               lambda rows: f"row(s) {', '.join(str(i + 1) for i in rows)} of them")
        self.state = {"labels": labels, "integer_labels": all(is_integer(label) for label in labels),
                      "thresholds": dict.fromkeys(labels, 0.5)}
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        elif test is not None:
            self._check_labels(test, "data.test_split" if data.test_split else "data.dataset_test_split",
                               "the test split", labels,
                               lambda rows: f"row(s) {', '.join(str(i + 1) for i in rows)} of it")
        counts = {label: 0 for label in labels}
        for row in train[data.label_column]:
            for label in row:
                counts[label] += 1
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}), "labels": labels,
                "train_label_counts": counts,
                "train_rows_without_label": int(sum(1 for row in train[data.label_column] if not row)),
                **provenance}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        labels = self.state["labels"]
        enc = self.encode(examples, processor)
        targets = multi_hot(examples[self.recipe.data.label_column].tolist(), labels)
        ids = self.example_ids(len(targets), training)
        return EncodedDataset(enc, [[float(v) for v in row] for row in targets], ids)

    # -- model ---------------------------------------------------------
    def head_config(self) -> dict[str, Any]:
        return {**super().head_config(), "problem_type": "multi_label_classification"}

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = self.forward(model, batch)
        return {"loss": out.loss, "predictions": torch.sigmoid(out.logits.float()), "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        # the eval split tunes the thresholds (kept in the state, saved with a new best adapter); the test split
        # and `finetune evaluate --input` score with the selected adapter's
        return thresholded_report(predictions, references, self.state["labels"], self.state,
                                  tune=self.evaluating == "eval")

    def _selected_thresholds(self) -> list[float]:
        return selected_thresholds(self.state, self.state["labels"])

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        import warnings

        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        splits = self.baseline_splits(splits)
        labels, column = self.state["labels"], self.recipe.data.label_column
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x_train = vectorizer.fit_transform(self.baseline_texts(splits.train))
        y_train = multi_hot(splits.train[column].tolist(), labels)
        clf = OneVsRestClassifier(LogisticRegression(max_iter=2000, C=10.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a label on every (or no) training row: a constant predictor
            clf.fit(x_train, y_train)
            pred = clf.predict(vectorizer.transform(self.baseline_texts(splits.eval)))
        metrics = multilabel_metrics(pred > 0.5, multi_hot(splits.eval[column].tolist(), labels) > 0.5, labels)
        metrics.pop("per_label")
        return {"name": "word TF-IDF + one-vs-rest logistic regression", **metrics}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        labels = self.state["labels"]
        thresholds = self._selected_thresholds()
        integer = self.state.get("integer_labels")
        rows = []
        probs = torch.sigmoid(self.batched_logits(model, processor, records, batch_size)).tolist()
        for record, p in zip(records, probs):
            chosen = [int(name) if integer else name
                      for name, value, t in zip(labels, p, thresholds) if value >= t]
            rows.append({**record, "pred_labels": chosen,
                         **{f"prob_{name}": float(p[i]) for i, name in enumerate(labels)}})
        return rows

    def export_decision(self) -> str:
        labels = self.state.get("labels", [])
        thresholds = [round(t, 2) for t in self._selected_thresholds()] if labels else []
        return (f"labels = {labels!r}\nthresholds = {thresholds!r}  # tuned on the eval split\n"
                "probs = 1 / (1 + np.exp(-logits[0]))\n"
                "print([name for name, p, t in zip(labels, probs, thresholds) if p >= t])\n")

    def usage_snippet(self, base: str) -> str:
        labels = self.state.get("labels", [])
        thresholds = [round(t, 2) for t in self._selected_thresholds()] if labels else []
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"labels = {labels!r}\n"
            f"thresholds = {thresholds!r}  # tuned on the eval split\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=len(labels),\n"
            "    problem_type='multi_label_classification')\n"
            f"{self.pooling_snippet()}"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "probs = model(**tokenizer(['some text'], return_tensors='pt')).logits.sigmoid()[0]\n"
            "print([name for name, p, t in zip(labels, probs.tolist(), thresholds) if p >= t])")


def _row_numbers(rows: list[int]) -> str:
    return "row(s) " + ", ".join(str(i + 1) for i in rows)
