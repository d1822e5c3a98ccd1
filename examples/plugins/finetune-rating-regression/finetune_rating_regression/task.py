"""The `rating-regression` task: predict a number from a text with a transformers encoder + LoRA."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    Task,
    TaskOptions,
    attention_projections,
    load_table,
    require_columns,
    split_frame,
)


class RatingRegressionTaskData(DataOptions):
    text_column: str = Field("text", description="Column with the input text.")
    target_column: str = Field("target", description="Column with the number to predict.")
    max_length: int = Field(128, gt=0, description="Tokens kept per text.")


class RatingRegressionTaskOptions(TaskOptions):
    normalize_target: bool = Field(True, description="Train on standardised targets (mean 0, std 1).")


class RatingRegressionTask(Task):
    name = "rating-regression"
    description = "Predict a number from a text (a score, a rating) with a transformers encoder."
    task_options = RatingRegressionTaskOptions
    data_options = RatingRegressionTaskData
    default_metric = "mse"
    metric_names = ("mse", "mae", "pearson")
    lower_is_better = ("mse", "mae")
    pipeline_tag = "text-classification"  # the Hub has no text-regression tag; this is the closest
    prediction_fields = {"pred_value": "the predicted number"}

    # -- data ----------------------------------------------------------
    def _read(self, path: str, key: str):
        import pandas as pd

        data = self.recipe.data
        df = load_table(path, data.format, key=key)
        require_columns(df, {"data.text_column": data.text_column, "data.target_column": data.target_column,
                             "data.group_column": data.group_column}, path)
        target = pd.to_numeric(df[data.target_column], errors="coerce")
        bad = [i for i, v in enumerate(target) if v != v]  # NaN: empty or not a number
        if bad:
            raise DataError(f"{key}: {path}: data.target_column ({data.target_column!r}) must hold numbers; "
                            f"row(s) {', '.join(str(i + 1) for i in bad[:5])} do not (e.g. "
                            f"{_shown(df[data.target_column].iloc[bad[0]])}). Fix or remove them.")
        df[data.target_column] = target.astype(float)
        df[data.text_column] = df[data.text_column].astype(str)
        return df

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        train = self._read(data.train, "data.train")
        test = None
        if data.test_split:  # the test rows first: they never depend on the eval settings
            train, test = split_frame(train, data.test_split, self.recipe.train.seed, group=data.group_column,
                                      key="data.test_split")
        if data.limit:  # at most this many training rows (quick tries), the same ones for a given seed
            train = train.sample(n=min(data.limit, len(train)), random_state=self.recipe.train.seed)
        if data.eval:
            eval_ = self._read(data.eval, "data.eval")
        else:
            train, eval_ = split_frame(train, data.split, self.recipe.train.seed, group=data.group_column)
        if len(train) < 2 or train[data.target_column].std() == 0:
            raise DataError(f"data.train: {data.train}: the target must vary across at least two rows.")
        mean, std = float(train[data.target_column].mean()), float(train[data.target_column].std())
        self.state = {"mean": mean, "std": std if self.recipe.task.normalize_target else 1.0,
                      "center": mean if self.recipe.task.normalize_target else 0.0}
        if data.test:  # scored once after training with the selected adapter; never selects
            test = self.read_examples(data.test, "data.test")
        info = {"train_examples": len(train), "eval_examples": len(eval_), "target_mean": round(mean, 4),
                "target_std": round(std, 4)}
        if test is not None:
            info["test_examples"] = len(test)
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def read_examples(self, path: Any, key: str) -> Any:
        """A labelled file (data.test, `finetune evaluate --input`) with the text and target columns."""
        return self._read(str(path), key)

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        data = self.recipe.data
        enc = processor(examples[data.text_column].tolist(), truncation=True, max_length=data.max_length)
        targets = ((examples[data.target_column] - self.state["center"]) / self.state["std"]).tolist()
        return [{**{k: v[i] for k, v in enc.items()}, "labels": float(targets[i])} for i in range(len(targets))]

    def collate_fn(self, processor: Any):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor, return_tensors="pt")

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone.path, num_labels=1, problem_type="regression", **kwargs)
        return model, tokenizer

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)  # the query/value projections of most transformers models

    def modules_to_save(self, model: Any) -> list[str]:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        return [n for n in ("classifier", "score", "pooler", "pre_classifier") if n in names]

    def peft_task_type(self) -> str:
        return "SEQ_CLS"

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        out = model(**batch)
        return {"loss": out.loss, "predictions": out.logits.squeeze(-1).float(), "references": batch["labels"].float()}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        import numpy as np

        pred = predictions * self.state["std"] + self.state["center"]
        ref = references * self.state["std"] + self.state["center"]
        pearson = float(np.corrcoef(pred, ref)[0, 1]) if np.std(pred) > 0 and np.std(ref) > 0 else 0.0
        return {"mse": float(np.mean((pred - ref) ** 2)), "mae": float(np.mean(np.abs(pred - ref))),
                "pearson": pearson}

    def baseline(self, splits: DataSplits) -> dict[str, Any]:
        import numpy as np

        ref = splits.eval[self.recipe.data.target_column].to_numpy()
        pred = np.full_like(ref, self.state["mean"])
        return {"name": "predict the training mean", "mse": float(np.mean((pred - ref) ** 2)),
                "mae": float(np.mean(np.abs(pred - ref)))}

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.text_column]

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], batch_size: int = 32,
                stream: bool = False) -> list[dict[str, Any]]:
        column = self.recipe.data.text_column
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            enc = processor([str(r[column]) for r in chunk], truncation=True, padding=True,
                            max_length=self.recipe.data.max_length, return_tensors="pt").to(device)
            values = model(**enc).logits.squeeze(-1).float().cpu() * self.state["std"] + self.state["center"]
            rows += [{**r, "pred_value": float(v)} for r, v in zip(chunk, values)]
        return rows

    def usage_snippet(self, base: str) -> str:
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "value = model(**tokenizer(['some text'], return_tensors='pt')).logits[0, 0].item()\n"
            f"print(value * {self.state['std']!r} + {self.state['center']!r})  # back to the target's scale")


def _shown(value: Any) -> str:
    """A cell as a person reads it: (empty) for a missing value, else its text."""
    if value is None or (isinstance(value, float) and value != value):
        return "(empty)"
    return repr(str(value))


def claim_data(probe: Any) -> Any:
    """`finetune init DATA`: claim data with the columns this task reads by default (the hook
    ``finetune_claim_data`` calls it). ``probe`` has read the file once (``probe.table.columns``: each
    column summarised); edit this to recognise your own data. Score 0.6: a built-in task claiming the same
    data with more confidence wins, and this one is offered with ``--task`` (docs/plugins.md)."""
    from finetune import Claim

    table = probe.table
    if table is None:
        return None
    text, target = table.columns.get("text"), table.columns.get("target")
    if text is None or target is None or text.kind != "text" or not target.numeric:
        return None
    reasons = [f"column `text` looks like text ({text.describe()}) and `target` holds numbers ({target.describe()})"]
    return Claim(task=RatingRegressionTask.name, score=0.6, reasons=reasons,
                 settings={"model": {"backbone": "sentence-transformers/all-MiniLM-L6-v2"},
                           "data": {"train": probe.path, "split": 0.2}},
                 comments={"model.backbone": "offline on a finetune install"})
