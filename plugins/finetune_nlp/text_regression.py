"""``text-regression``: predict a number from a text or a text pair (a rating, a readability score, the
semantic similarity of two sentences as in STS-B) with any transformers encoder.

Data: a table with a text column (and optionally a second text column for pairs) and a numeric target
column. The head is one linear output trained with mean squared error on standardised targets (mean 0,
standard deviation 1 over the training split; ``task.normalize_target``), and predictions are mapped back
to the target's scale. Metrics: RMSE (selects the checkpoint by default; lower is better), MAE, R², and
Pearson and Spearman correlation (set ``train.metric = "spearman"`` for STS-style ranking). Baselines:
character n-gram TF-IDF + ridge regression, and the training mean (its RMSE is ``mean_rmse``).
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
    require_columns,
)
from finetune_nlp.text_classification import TextClassificationOptions
from finetune_nlp.text_shared import EncodedDataset, EncoderClassifier, row_locations, table_splits


class TextRegressionData(DataOptions):
    train: PathStr | None = Field(None, description="Training table: a .csv, .tsv, .jsonl, .json or .parquet file "
                                  "with `text_column` and `target_column` (or give `dataset`).")
    eval: PathStr | None = Field(None, description="Evaluation table with the same columns; if absent, `split` of "
                                 "train is held out at random (`group_column` keeps groups whole).")
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs, e.g. "
                                         "similarity).")
    target_column: str = Field("target", description="Column holding the number to predict.")
    max_length: int = Field(128, gt=0, le=8192, description="Truncate texts (pairs: both together) to this many "
                            "tokens.")


class TextRegressionOptions(TextClassificationOptions):
    baseline: bool = Field(True, description="Also score a character n-gram TF-IDF + ridge regression baseline "
                           "(and the training mean) on the split. On bigger tables it fits and scores on a "
                           "seeded sample of 50,000 train and 50,000 eval rows (said on stderr).")
    normalize_target: bool = Field(True, description="Train on standardised targets (mean 0, standard deviation 1 "
                                   "over the training split); predictions are always on the target's own scale.")


class TextRegression(EncoderClassifier):
    name = "text-regression"
    description = "Predict a number from a text or a text pair (ratings, similarity) with a transformers encoder."
    task_options = TextRegressionOptions
    data_options = TextRegressionData
    default_metric = "rmse"
    metric_names = ("rmse", "mae", "r2", "pearson", "spearman")
    lower_is_better = ("rmse", "mae")
    pipeline_tag = "text-classification"  # the Hub's tag for a sequence-classification head (num_labels = 1)
    library_name = "peft"
    prediction_fields = {"pred_value": "the predicted number, on the target's scale"}

    # -- data ----------------------------------------------------------
    def _read(self, path: str | Path, key: str) -> Any:
        data = self.recipe.data
        return self._checked(load_table(path, data.format, key=key), key, str(path),
                             lambda rows: row_locations(path, data.format, rows))

    def _checked(self, df: Any, key: str, where: str, locations: Any) -> Any:
        """Columns present, no empty text, targets numeric (errors name ``where`` and the rows)."""
        import pandas as pd

        data = self.recipe.data
        require_columns(df, {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column,
                             "data.target_column": data.target_column, "data.group_column": data.group_column},
                        where)
        self.check_texts(df, key, where, locations)
        raw = df[data.target_column]
        target = pd.to_numeric(raw, errors="coerce").astype(float)
        bad = [i for i, (v, r) in enumerate(zip(target.tolist(), raw.tolist())) if v != v or abs(v) == float("inf")]
        if bad:
            shown = raw.iloc[bad[0]]
            shown = "(empty)" if shown is None or (isinstance(shown, float) and shown != shown) else repr(str(shown))
            raise DataError(f"{key}: {where}: data.target_column ({data.target_column!r}) must hold finite numbers; "
                            f"{len(bad)} row(s) do not, e.g. {locations(bad[:5])} ({shown}). Fix or remove them.")
        df[data.target_column] = target
        return df

    def read_examples(self, path: Path, key: str) -> Any:
        """A labelled table (data.test, ``finetune evaluate --input``) with the text and target columns."""
        return self._read(path, key)

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        rows = lambda rows: "row(s) " + ", ".join(str(i + 1) for i in rows)  # noqa: E731
        train, eval_, test, train_where, provenance = table_splits(
            self, self._read, lambda split, key: self._checked(split.frame(), key, split.where, rows))
        values = train[data.target_column]
        if len(train) < 2 or float(values.std()) == 0.0:
            raise DataError(f"data.target_column: the target ({data.target_column!r}) of the training data "
                            f"({train_where}) must vary across at least two rows; it is {values.iloc[0]!r} on all "
                            f"{len(train)}.")
        mean, std = float(values.mean()), float(values.std())
        normalize = self.recipe.task.normalize_target
        self.state = {"mean": mean, "std": std, "center": mean if normalize else 0.0,
                      "scale": std if normalize else 1.0}
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}),
                "target_mean": round(mean, 4), "target_std": round(std, 4),
                "target_range": [float(values.min()), float(values.max())], **provenance}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        targets = (examples[self.recipe.data.target_column] - self.state["center"]) / self.state["scale"]
        enc = self.encode(examples, processor)
        return EncodedDataset(enc, targets.astype(float).tolist(), self.example_ids(len(targets), training))

    # -- model ---------------------------------------------------------
    def head_config(self) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.forward(model, batch)
        return {"loss": out.loss, "predictions": out.logits.squeeze(-1).float(),
                "references": batch["labels"].float()}

    def export_decision(self) -> str:
        return (f"print(float(logits[0, 0]) * {self.state.get('scale', 1.0)!r} + {self.state.get('center', 0.0)!r})"
                "  # the model predicts the standardised target\n")

    def _unscale(self, values: Any) -> Any:
        return values * self.state["scale"] + self.state["center"]

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        import numpy as np

        pred = self._unscale(np.asarray(predictions, dtype=float))
        ref = self._unscale(np.asarray(references, dtype=float))
        return regression_metrics(pred, ref)

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline

        splits = self.baseline_splits(splits)
        column = self.recipe.data.target_column
        model = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                              Ridge(alpha=1.0))
        model.fit(self.baseline_texts(splits.train), splits.train[column].to_numpy())
        ref = splits.eval[column].to_numpy(dtype=float)
        metrics = regression_metrics(model.predict(self.baseline_texts(splits.eval)), ref)
        mean_rmse = float(np.sqrt(np.mean((ref - self.state["mean"]) ** 2)))
        return {"name": "char n-gram TF-IDF + ridge regression", **metrics, "mean_rmse": mean_rmse}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        if not records:
            return []
        values = self._unscale(self.batched_logits(model, processor, records, batch_size).squeeze(-1))
        return [{**record, "pred_value": float(v)} for record, v in zip(records, values.tolist())]

    def usage_snippet(self, base: str) -> str:
        pair = ", ['a second text']" if self.recipe.data.text_pair_column else ""
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
            f"{self.pooling_snippet()}"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            f"value = model(**tokenizer(['some text']{pair}, return_tensors='pt')).logits[0, 0].item()\n"
            f"print(value * {self.state['scale']!r} + {self.state['center']!r})  # on the target's scale")


def regression_metrics(pred: Any, ref: Any) -> dict[str, float]:
    """RMSE, MAE, R² and Pearson / Spearman correlation (0.0 when either side is constant)."""
    import numpy as np
    from scipy.stats import spearmanr

    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    err = pred - ref
    varies = len(ref) > 1 and np.std(pred) > 0 and np.std(ref) > 0
    total = float(np.sum((ref - ref.mean()) ** 2)) if len(ref) else 0.0
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
            "r2": 1.0 - float(np.sum(err ** 2)) / total if total > 0 else 0.0,
            "pearson": float(np.corrcoef(pred, ref)[0, 1]) if varies else 0.0,
            "spearman": float(spearmanr(pred, ref).statistic) if varies else 0.0}
