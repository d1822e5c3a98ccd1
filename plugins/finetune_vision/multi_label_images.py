"""``multi-label-image-classification``: each image gets any number of labels, none included.

Data: a table (.csv, .tsv, .jsonl, .parquet) with an image column (file paths, relative to the table)
and a labels column holding, per row, a list of labels (a JSON list in .jsonl/.parquet, or a JSON list
written as text in a .csv) or labels separated by ``data.label_delimiter`` (``"cat,dog"``); an empty cell
or ``[]`` is an image with none of the labels. ``data.eval`` / ``data.split`` / ``data.test`` /
``data.test_split`` as for every task. Every image is opened before anything is written: a missing or
unreadable file is a DataError naming the table row (or, with ``data.on_bad_image = "skip"``, a warning
and the row left out).

Model: the image-classification backbone loading (``finetune_vision.image_task``: timm or transformers,
the offline zoo, channels-last input for CNNs, frozen and folded BatchNorm under LoRA) with one output
per label, trained with binary cross-entropy on the sigmoid of each. Each label's decision threshold is
tuned on the eval split at every evaluation (``finetune.thresholded_report``); the thresholds of the
selected checkpoint are saved with its adapter (the task state) and used by ``predict``,
``finetune evaluate`` and the test split. Metrics (``finetune.multilabel_report``): micro-F1 (selects the
checkpoint), macro-F1, mAP (mean per-label average precision, threshold-free), subset accuracy, the F1s
and subset accuracy at a fixed 0.5 threshold (``*_at05``), and a per-label report. Baseline: the training
data's label frequencies as every image's probabilities (no pixels looked at), scored the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import (
    DataError,
    DataSplits,
    PathStr,
    RecipeError,
    load_table,
    multi_hot,
    multilabel_report,
    parse_labels,
    require_columns,
    selected_thresholds,
    sorted_labels,
    split_frame,
    thresholded_report,
)
from finetune_vision.image_task import BackboneOptions, ImageBackboneTask, ImageData, ImageDataset, image_sources
from finetune_vision.images import IMAGE_EXTENSIONS


class MultiLabelImageData(ImageData):
    source_keys = ("train",)

    train: PathStr | None = Field(
        None, description="Training table (.csv, .tsv, .jsonl or .parquet) with `image_column` (image file paths, "
                          "relative to the table) and `label_column` (each image's labels).")
    eval: PathStr | None = Field(None, description="Evaluation table with the same columns; if absent, `split` of "
                                 "train is held out at random (`group_column` keeps groups whole). It also tunes "
                                 "each label's threshold.")
    image_column: str = Field("image", description="Column with the image file paths (relative to the table, or "
                              "absolute).")
    label_column: str = Field("labels", description="Column holding each image's labels: a list (JSON lines, "
                              "parquet), a JSON list written as text (`[\"cat\", \"dog\"]`), or labels separated by "
                              "`label_delimiter` (`cat,dog`); an empty cell or `[]` is an image with no label.")
    label_delimiter: str = Field(",", min_length=1, description="Separates the labels of a cell written as one "
                                 "string (`cat,dog`); spaces around each label are ignored.")


class MultiLabelImageOptions(BackboneOptions):
    baseline: bool = Field(True, description="Also score the label-frequency baseline on the eval split: every "
                           "image gets each label's training frequency as its probability (so the labels on more "
                           "than half of the training images), what a model that ignores the pixels can do.")


class MultiLabelImageClassification(ImageBackboneTask):
    name = "multi-label-image-classification"
    description = "Tag images with any number of labels (timm or transformers backbone, sigmoid outputs, tuned " \
                  "thresholds)."
    task_options = MultiLabelImageOptions
    data_options = MultiLabelImageData
    default_metric = "micro_f1"
    metric_names = ("micro_f1", "macro_f1", "map", "subset_accuracy", "micro_f1_at05", "macro_f1_at05",
                    "subset_accuracy_at05")
    pipeline_tag = "image-classification"
    prediction_fields = {"pred_labels": "the labels whose probability reaches their tuned threshold (a list; "
                                        "null when the image could not be read)",
                         "prob_<label>": "the probability of each label",
                         "pred_error": "why the image could not be read (only then)"}

    # -- data ----------------------------------------------------------
    def _read(self, location: str | Path | None, key: str) -> Any:
        """A DataFrame with columns ``image`` (absolute path), ``labels`` (list of str), ``row`` (where the
        row is, for messages) and the group column when set."""
        import pandas as pd

        data = self.recipe.data
        path = Path(location) if location is not None else None
        if path is not None and path.is_dir():
            raise DataError(f"{key}: {path} is a folder; multi-label-image-classification reads a table (.csv, "
                            f".jsonl, .parquet) with an image path column ({data.image_column!r}) and a labels "
                            f"column ({data.label_column!r}), e.g. a CSV with the header "
                            f"{data.image_column},{data.label_column}.")
        if path is not None and path.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"{key}: {path} is a single image; give a table of image paths and their labels.")
        df = load_table(path, data.format, key=key)
        require_columns(df, {"data.image_column": data.image_column, "data.label_column": data.label_column,
                             "data.group_column": data.group_column}, path)
        kind = (data.format if data.format != "auto" else path.suffix.lower().lstrip("."))
        where = [f"{path.name} line {i + 2}" if kind in ("csv", "tsv") else
                 f"{path.name} line {i + 1}" if kind in ("jsonl", "ndjson") else f"{path.name} row {i + 1}"
                 for i in range(len(df))]
        images = []
        for i, value in enumerate(df[data.image_column].tolist()):
            if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
                raise DataError(f"{key}: {where[i]}: no image path in data.image_column ({data.image_column!r}); "
                                "fill it or remove the row.")
            image = Path(str(value).strip())
            images.append(str(image if image.is_absolute() else (path.parent / image).resolve()))
        parsed = []
        for i, value in enumerate(df[data.label_column].tolist()):
            if value is None or (isinstance(value, float) and value != value) or \
                    (isinstance(value, str) and not value.strip()):
                parsed.append([])  # an empty cell: an image with none of the labels
                continue
            try:
                parsed.append(parse_labels(value, data.label_delimiter))
            except ValueError as exc:
                raise DataError(f"{key}: {where[i]}: data.label_column ({data.label_column!r}): {exc}") from None
        out = pd.DataFrame({"image": images, "labels": parsed, "row": where})
        if data.group_column:
            out[data.group_column] = df[data.group_column].astype(str).values
        return out

    def _read_checked(self, location: str | Path | None, key: str) -> tuple[Any, list[str]]:
        df = self._read(location, key)
        rows = df["row"].tolist()
        df, skipped = self._drop_bad_images(df, key, lambda i: rows[i])
        if len(df) == 0:
            raise DataError(f"{key}: no readable images in {location}.")
        return df, skipped

    def _check_labels(self, df: Any, key: str, where: str, labels: list[str]) -> None:
        known = set(labels)
        bad = [i for i, row in enumerate(df["labels"].tolist()) if set(row) - known]
        if bad:
            unseen = sorted_labels({x for row in df["labels"] for x in row} - known)
            shown = ", ".join(df["row"].iloc[i] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DataError(f"{key}: labels {unseen} appear in {where} ({shown}) but never in the training data "
                            f"(training labels: {labels}); add training images with them or drop those rows.")

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        seed = self.recipe.train.seed
        if data.dataset:
            raise RecipeError("data.dataset: multi-label-image-classification reads a table of image paths and "
                              "labels (data.train), not a data set; export it to a .parquet/.csv with an image path "
                              "column and a labels column, or use task image-classification for one label per image.")
        train, skipped = self._read_checked(data.train, "data.train")
        test = None
        if data.test_split:  # held out first, so the test images never depend on the eval settings
            train, test = split_frame(train, data.test_split, seed, group=data.group_column, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=seed).reset_index(drop=True)
        if data.eval:
            eval_, skipped_eval = self._read_checked(data.eval, "data.eval")
            skipped += skipped_eval
            eval_key, eval_where = "data.eval", str(data.eval)
        else:
            train, eval_ = split_frame(train, data.split, seed, group=data.group_column)
            eval_key, eval_where = "data.split", f"the eval rows held out from {data.train}"
        labels = sorted_labels(x for row in train["labels"] for x in row)
        if not labels:
            raise DataError(f"data.label_column: no image of the training data ({data.train}) has a label "
                            f"({data.label_column!r}); multi-label classification needs at least one label.")
        self._check_labels(eval_, eval_key, eval_where, labels)
        self.state = {"labels": labels, "thresholds": dict.fromkeys(labels, 0.5)}
        if data.test:
            test, skipped_test = self._read_checked(data.test, "data.test")
            skipped += skipped_test
            self._check_labels(test, "data.test", str(data.test), labels)
        elif test is not None:
            self._check_labels(test, "data.test_split", "the test split", labels)
        counts = {label: 0 for label in labels}
        for row in train["labels"]:
            for label in row:
                counts[label] += 1
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}), "labels": labels,
                "train_label_counts": counts,
                "train_images_without_label": int(sum(1 for row in train["labels"] if not row)),
                "train_from": str(data.train)}
        if skipped:
            info["skipped_images"] = skipped
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled images (data.test, ``finetune evaluate --input``): a table as ``data.train`` takes,
        unreadable images handled by ``data.on_bad_image``, labels known from training."""
        df, _ = self._read_checked(path, key)
        self._check_labels(df, key, str(path), self.state["labels"])
        return df

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        targets = multi_hot(examples["labels"].tolist(), self.state["labels"])
        transform = processor.transform(training=training, options=self.recipe.data)
        return ImageDataset(image_sources(examples), [[float(v) for v in row] for row in targets], transform,
                            examples["image"].tolist())

    def collate_fn(self, processor: Any):
        return _collate

    # -- training and evaluation -----------------------------------------
    @staticmethod
    def _loss(logits: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self._loss(self._logits(model, batch["pixel_values"]), batch["labels"])

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        logits = self._logits(model, batch["pixel_values"]).float()
        return {"loss": self._loss(logits, batch["labels"]), "predictions": torch.sigmoid(logits),
                "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        # the eval split tunes the thresholds (kept in the state, saved with a new best adapter); the test split
        # and `finetune evaluate --input` score with the selected adapter's
        return thresholded_report(predictions, references, self.state["labels"], self.state,
                                  tune=self.evaluating == "eval")

    def selected_thresholds(self) -> list[float]:
        """The thresholds in the state, in label order (``finetune.selected_thresholds``)."""
        return selected_thresholds(self.state, self.state["labels"])

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        import numpy as np

        labels = self.state["labels"]
        frequency = multi_hot(splits.train["labels"].tolist(), labels).mean(axis=0)
        refs = multi_hot(splits.eval["labels"].tolist(), labels)
        report = multilabel_report(np.tile(frequency, (len(refs), 1)), refs, labels, [0.5] * len(labels))
        return {"name": "label frequencies of the training data (no pixels)",
                **{k: v for k, v in report.items() if k != "per_label" and not k.endswith("_at05")}}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        labels = self.state["labels"]
        thresholds = self.selected_thresholds()
        rows: list[dict[str, Any]] = []
        for record, logits, error in self._image_logits(model, processor, records, batch_size):
            if logits is None:
                rows.append({**record, "pred_labels": None, **{f"prob_{name}": None for name in labels},
                             "pred_error": error})
                continue
            probs = torch.sigmoid(logits).tolist()
            rows.append({**record, "pred_labels": [name for name, p, t in zip(labels, probs, thresholds) if p >= t],
                         **{f"prob_{name}": float(p) for name, p in zip(labels, probs)}})
        return rows

    def draw_predictions(self, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
        """One PNG per predicted image, ``<image stem>.png`` (``<stem>_2.png``... when two inputs share a name):
        the image (scaled to 256-512 px wide) above a list of every label with its probability and threshold,
        the predicted ones marked and in green. Rows whose image could not be read (``pred_error``) or is not
        a file (encoded bytes) are left out."""
        from PIL import Image, ImageDraw, ImageFont

        from finetune_vision.images import load_rgb

        labels = self.state["labels"]
        thresholds = self.selected_thresholds()
        column = self.recipe.data.image_column
        folder = Path(folder)
        written: list[Path] = []
        taken: set[Path] = set()
        font = ImageFont.load_default()
        for row in rows:
            source = row.get(column)
            if row.get("pred_error") or row.get("pred_labels") is None or not source:
                continue
            try:
                image = load_rgb(source)
            except Exception:  # noqa: BLE001 - changed since predict: nothing to draw
                continue
            width = min(max(image.width, 256), 512)
            image = image.resize((width, max(1, round(image.height * width / image.width))))
            line = 14
            canvas = Image.new("RGB", (width, image.height + 8 + line * len(labels)), "white")
            canvas.paste(image, (0, 0))
            draw = ImageDraw.Draw(canvas)
            chosen = set(row["pred_labels"])
            for i, (name, t) in enumerate(zip(labels, thresholds)):
                p = row.get(f"prob_{name}")
                mark = "[x]" if name in chosen else "[ ]"
                text = f"{mark} {name}: {p:.2f} (threshold {t:.2f})" if p is not None else f"{mark} {name}"
                draw.text((4, image.height + 4 + i * line), text, font=font,
                          fill=(0, 130, 0) if name in chosen else (110, 110, 110))
            stem = Path(str(source)).stem
            path, k = folder / f"{stem}.png", 1
            while path in taken:  # two inputs with one name (a/x.jpg, b/x.jpg): x.png, x_2.png
                k += 1
                path = folder / f"{stem}_{k}.png"
            taken.add(path)
            canvas.save(path)
            written.append(path)
        return written

    def export_thresholds(self) -> list[float] | None:
        return self.selected_thresholds()

    def usage_snippet(self, base: str) -> str:
        from finetune_vision.models import usage_snippet

        return usage_snippet(self.state, base, self.recipe.peft.method, self.selected_thresholds())


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "labels": torch.tensor([it["labels"] for it in items], dtype=torch.float32)}
    return batch
