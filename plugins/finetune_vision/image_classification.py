"""``image-classification``: LoRA (or linear probing / full fine-tuning) of timm and transformers backbones.

Data: an image folder (one subfolder per class), a CSV/JSONL/Parquet table of image paths and labels,
a Hugging Face ``datasets`` source (``data.dataset``: a Hub data set, downloaded when online, a
save_to_disk folder, or local parquet/arrow files; see ``finetune_vision.hf_datasets``),
or a built-in source exported from a PyPI package (``data.source = "sklearn-digits"``). Unreadable
images are listed (names and count) before anything is written, then skipped or fatal
(``data.on_bad_image``). Preprocessing follows the backbone's own pretrained configuration (timm data
config or the transformers image processor); augmentation is opt-in and applies to training only.

BatchNorm: with LoRA or a linear probe, BatchNorm layers stay in eval mode during training, so their
running statistics (base-model buffers, which an adapter does not save) never change and a reloaded
adapter reproduces the trained model exactly. Full fine-tuning trains them and saves every buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import (
    DataError,
    DataSplits,
    PathStr,
    label_text,
    load_table,
    require_columns,
    sorted_labels,
    split_frame,
)
from finetune_vision.image_task import BackboneOptions, ImageBackboneTask, ImageData, ImageDataset, image_sources
from finetune_vision.images import EVAL_FOLDER_NAMES, IMAGE_EXTENSIONS

SOURCES = ("sklearn-digits",)


class ImageClassificationData(ImageData):
    source_keys = ("train", "source", "dataset")

    train: PathStr | None = Field(
        None, description="Image folder (one subfolder per class; or with train/ and val/ inside), or a "
                          ".csv/.jsonl/.parquet table of image paths and labels. Or give `source` or `dataset`.")
    eval: PathStr | None = Field(None, description="Eval image folder or table; if absent, `split` of train is "
                                                   "held out (stratified by class).")
    source: Literal["sklearn-digits"] | None = Field(
        None, description="Built-in dataset exported as an image folder on first use: 'sklearn-digits' "
                          "(scikit-learn's 1,797 8x8 handwritten digits, 10 classes).")
    image_column: str = Field("image", description="Table/dataset column with the images: file paths (relative to "
                                                   "the table or dataset folder), or with `dataset` a datasets Image "
                                                   "feature or encoded image bytes.")
    label_column: str = Field("label", description="Table/dataset column with labels: strings or integers, or with "
                                                   "`dataset` a ClassLabel (its names become the label names).")


class ImageClassificationOptions(BackboneOptions):
    top_k: int = Field(5, gt=0, description="k of the top-k accuracy metric and of the classes predict prints.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")


class ImageClassification(ImageBackboneTask):
    name = "image-classification"
    description = "Classify images with a timm or transformers backbone (LoRA, linear probe or full)."
    task_options = ImageClassificationOptions
    data_options = ImageClassificationData
    default_metric = "accuracy"
    metric_names = ("accuracy", "top_k_accuracy", "macro_f1")
    pipeline_tag = "image-classification"
    prediction_fields = {"pred_label": "the most likely label (empty when the image could not be read)",
                         "pred_score": "its probability",
                         "pred_label_<k>": "the k-th most likely label, k = 1 .. task.top_k",
                         "pred_score_<k>": "its probability",
                         "pred_error": "why the image could not be read (only then)"}

    # -- data ----------------------------------------------------------
    def _train_location(self) -> tuple[str, str]:
        data = self.recipe.data
        if data.source:  # the core checked that one source is set, not two
            from finetune_vision.sources import export_source

            return str(export_source(data.source)), "data.source"
        return data.train, "data.train"

    def _read(self, location: str, key: str):
        """A DataFrame with columns ``image`` (absolute path) and ``label`` (str)."""
        import pandas as pd

        data = self.recipe.data
        path = Path(location)
        if not path.exists():
            raise DataError(f"{key}: folder not found: {path}. Give an image folder (one subfolder per class) or "
                            "a .csv/.jsonl table of image paths and labels (relative paths resolve against the "
                            "recipe's folder).")
        if path.is_dir():
            from finetune_vision.images import scan_class_folders

            rows = scan_class_folders(path, key)
            return pd.DataFrame(rows, columns=["image", "label"])
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"{key}: {path} is a single image; give a folder with one subfolder per class, "
                            "or a table of image paths and labels.")
        df = load_table(path, data.format, key=key)
        require_columns(df, {"data.image_column": data.image_column, "data.label_column": data.label_column,
                             "data.group_column": data.group_column}, path)
        missing = df[data.image_column].isna() | df[data.label_column].isna()
        if missing.any():
            bad = [i + 2 for i, m in enumerate(missing.tolist()) if m][:5]
            raise DataError(f"{key}: {path}: {int(missing.sum())} row(s) have no image path or label (e.g. line(s) "
                            f"{bad}); fill or remove them.")
        base = path.parent
        out = pd.DataFrame({
            "image": [str((base / str(p)).resolve()) if not Path(str(p)).is_absolute() else str(p)
                      for p in df[data.image_column]],
            "label": [label_text(v) for v in df[data.label_column]],
        })
        if data.group_column:
            out[data.group_column] = df[data.group_column].astype(str).values
        return out

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        eval_ = test = None
        label_order = None
        extra_info: dict[str, Any] = {}
        if data.dataset:
            from finetune_vision.hf_datasets import load_frames

            source = self.recipe.source
            frames = load_frames(data, source.parent if source is not None else None)
            location, key = frames.resolved, "data.dataset"
            train, eval_, label_order, extra_info = frames.train, frames.eval, frames.label_order, frames.info
            if frames.test is not None:
                test, skipped_test = self._drop_bad_images(frames.test, "data.dataset_test_split")
            eval_location = data.dataset_eval_split and f"{location}[{data.dataset_eval_split}]"
        else:
            location, key = self._train_location()
            eval_location = data.eval
            folder = Path(location)
            if not eval_location and folder.is_dir():
                # "split by folder": train/ beside val/ (or eval/, validation/, test/)
                subs = {p.name for p in folder.iterdir() if p.is_dir()}
                eval_name = next((n for n in EVAL_FOLDER_NAMES if n in subs), None)
                if "train" in subs and eval_name and len(subs) == 2:
                    location, eval_location = str(folder / "train"), str(folder / eval_name)
            train = self._read(location, key)
        train, skipped = self._drop_bad_images(train, key)
        if test is not None:
            skipped += skipped_test
        if data.test_split:  # held out first, so the test images never depend on the eval settings
            train, test = split_frame(train, data.test_split, self.recipe.train.seed, stratify="label",
                                      group=data.group_column, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=self.recipe.train.seed) \
                .reset_index(drop=True)
        if eval_location:
            if eval_ is None:
                eval_ = self._read(eval_location, "data.eval")
            eval_, skipped_eval = self._drop_bad_images(eval_, "data.dataset_eval_split" if data.dataset
                                                        else "data.eval")
            skipped += skipped_eval
        else:
            train, eval_ = split_frame(train, data.split, self.recipe.train.seed, stratify="label",
                                       group=data.group_column)
        present = set(train["label"])
        labels = ([n for n in label_order if n in present] if label_order
                  else sorted_labels(present))
        if len(labels) < 2:
            raise DataError(f"{key}: only one class ({labels[0] if labels else 'none'!r}) in the training data "
                            f"({location}); classification needs at least two.")
        if len(eval_) == 0:
            raise DataError(f"data.eval: no eval images ({eval_location or 'split of ' + location}).")
        self._check_classes(eval_, "data.eval", "the eval data", labels)
        self.state = {"labels": labels}
        if data.test:
            test, skipped_test = self._read_labelled(data.test, "data.test")
            skipped += skipped_test
        if test is not None:
            self._check_classes(test, "data.test" if data.test else "data.test_split" if data.test_split
                                else "data.dataset_test_split", "the test data", labels)
        counts = train["label"].value_counts().to_dict()
        info = {"train_examples": len(train), "eval_examples": len(eval_),
                **({"test_examples": len(test)} if test is not None else {}), "labels": labels,
                "train_label_counts": {k: int(counts.get(k, 0)) for k in labels}, "train_from": location,
                **{k: v for k, v in extra_info.items() if v is not None}}
        if skipped:
            info["skipped_images"] = skipped
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled images (data.test, ``finetune evaluate --input``): a folder or table as ``data.train``
        takes, unreadable images handled by ``data.on_bad_image``, classes known from training."""
        df, _ = self._read_labelled(str(path), key)
        self._check_classes(df, key, str(path), self.state["labels"])
        return df

    def _read_labelled(self, location: str, key: str):
        df, skipped = self._drop_bad_images(self._read(location, key), key)
        if len(df) == 0:
            raise DataError(f"{key}: no readable images in {location}.")
        return df, skipped

    def _check_classes(self, df: Any, key: str, where: str, labels: list[str]) -> None:
        unseen = sorted_labels(set(df["label"]) - set(labels))
        if unseen:
            raise DataError(f"{key}: classes {unseen} appear in {where} but never in training "
                            f"(training classes: {labels}); add training images for them or drop them.")

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        label_ids = {label: i for i, label in enumerate(self.state["labels"])}
        transform = processor.transform(training=training, options=self.recipe.data)
        return ImageDataset(image_sources(examples), [label_ids[v] for v in examples["label"]], transform,
                            examples["image"].tolist())

    def collate_fn(self, processor: Any):
        return _collate

    # -- training and evaluation -----------------------------------------
    def _loss(self, logits: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, label_smoothing=self.recipe.task.label_smoothing)

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self._loss(self._logits(model, batch["pixel_values"]), batch["labels"])

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self._logits(model, batch["pixel_values"]).float()
        return {"loss": self._loss(logits, batch["labels"]), "predictions": logits, "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        import numpy as np
        from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

        labels = self.state["labels"]
        ids = list(range(len(labels)))
        pred = predictions.argmax(-1)
        k = min(self.recipe.task.top_k, len(labels))
        topk = np.argsort(-predictions, axis=-1)[:, :k]
        p, r, f, s = precision_recall_fscore_support(references, pred, labels=ids, zero_division=0)
        return {
            "accuracy": float((pred == references).mean()),
            "top_k_accuracy": float((topk == references[:, None]).any(-1).mean()),
            "macro_f1": float(f1_score(references, pred, labels=ids, average="macro", zero_division=0)),
            "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                      "support": int(s[i])} for i in ids},
            "confusion_matrix": confusion_matrix(references, pred, labels=ids).tolist(),
        }

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        matrix = metrics.get("best_details", {}).get("confusion_matrix")
        if matrix:
            from finetune_vision.plots import plot_confusion_matrix

            plot_confusion_matrix(matrix, self.state["labels"], run_path / "confusion_matrix.png",
                                  title=f"{self.name}: best eval (accuracy {metrics['best'].get('accuracy', 0):.3f})")

    # -- the run report --------------------------------------------------
    def data_summary(self, splits: DataSplits) -> dict[str, Any]:
        labels, counts = self.state["labels"], {}
        for name, frame in (("train", splits.train), ("eval", splits.eval), ("test", splits.test)):
            if frame is not None:
                found = frame["label"].value_counts().to_dict()
                counts[name] = {label: int(found.get(label, 0)) for label in labels}
        return {"label_counts": counts}

    def report_samples(self, model: Any, processor: Any, examples: Any, run_path: Path,
                       limit: int) -> list[dict[str, Any]]:
        """The first eval images predicted, mistakes first (up to half of ``limit`` from the first
        ``5 * limit``), each with a small thumbnail."""
        import torch

        from finetune_vision.images import load_rgb

        labels = self.state["labels"]
        pool = examples.head(5 * limit)
        column = self.recipe.data.image_column
        records = [{column: name, "source": source} for name, source in zip(pool["image"], image_sources(pool))]
        rows = []
        for record, reference, (_, logits, error) in zip(records, pool["label"],
                                                        self._image_logits(model, processor, records, 32)):
            if logits is None:
                rows.append({"input": _image_name(record[column]), "reference": str(reference),
                             "prediction": f"(unreadable: {error})", "correct": False})
                continue
            probs = torch.softmax(logits, dim=-1)
            best = int(probs.argmax())
            rows.append({"input": _image_name(record[column]), "reference": str(reference), "prediction": labels[best],
                         "correct": labels[best] == str(reference), "score": float(probs[best]),
                         "source": record["source"]})
        wrong = [i for i, r in enumerate(rows) if not r["correct"]][: limit // 2]
        right = [i for i, r in enumerate(rows) if r["correct"]][: limit - len(wrong)]
        chosen = [rows[i] for i in sorted(wrong + right)]
        for row in chosen:
            source = row.pop("source", None)
            if source is not None:
                row["image"] = _thumbnail(load_rgb(source))
        return chosen

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        labels = self.state["labels"]
        k = min(self.recipe.task.top_k, len(labels))
        rows: list[dict[str, Any]] = []
        for record, logits, error in self._image_logits(model, processor, records, batch_size):
            if logits is None:
                rows.append({**record, "pred_label": None, "pred_score": None, "pred_error": error})
                continue
            values, indices = torch.softmax(logits, dim=-1).topk(k)
            row = {**record, "pred_label": labels[int(indices[0])], "pred_score": float(values[0])}
            for j, (v, i) in enumerate(zip(values, indices), start=1):
                row[f"pred_label_{j}"] = labels[int(i)]
                row[f"pred_score_{j}"] = float(v)
            rows.append(row)
        return rows

    def usage_snippet(self, base: str) -> str:
        from finetune_vision.models import usage_snippet

        return usage_snippet(self.state, base, self.recipe.peft.method)


def _image_name(image: Any) -> str:
    """An image's folder and file name (class folders often hold files of the same names)."""
    if not isinstance(image, (str, Path)):
        return str(image)
    path = Path(str(image))
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _thumbnail(image: Any, size: int = 96) -> str:
    """A small PNG of a PIL image as a ``data:`` URI (the report page embeds it)."""
    import base64
    import io

    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}

