"""What the vision plugin's image-level tasks share (``image-classification``,
``multi-label-image-classification``): the image ``[data]`` keys (image column, bad images, input size,
augmentation), the ``[task]`` keys of the backbone (``init``, ``fold_batchnorm``), and a :class:`Task`
base that loads a timm or transformers backbone with a new head of ``len(state["labels"])`` outputs
(``finetune_vision.models``), picks the LoRA targets, keeps BatchNorm frozen and folded under LoRA or a
linear probe, feeds CNNs channels-last input, checks images, reads prediction inputs (a folder, an image,
a table, a datasets source) and runs the model over them in batches, an unreadable image reported on its
own row. Each task adds its data reading, loss, metrics and prediction fields.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, DataOptions, RecipeError, Task, TaskOptions
from finetune_vision.batchnorm_fold import FrozenBatchNormTask
from finetune_vision.images import ImagePredictInput, check_images, load_rgb


class ImageData(DataOptions):
    """``[data]`` keys of every image-level task: where the images are and how they are preprocessed."""

    image_column: str = Field("image", description="Table column with the image file paths (relative to the table).")
    label_column: str = Field("label", description="Table/dataset column with labels.")
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="Missing or undecodable images: 'fail' lists them and stops before training; "
                            "'skip' lists them and trains without them.")
    image_size: int | None = Field(None, gt=0, le=2048, description="Input side in pixels; default: the "
                                                                     "backbone's pretrained input size.")
    crop_pct: float | None = Field(None, gt=0, le=1, description="Eval centre crop as a fraction of the resized "
                                   "image (1.0: no crop); default: the backbone's pretrained crop_pct.")
    random_resized_crop: bool = Field(False, description="Training augmentation: random resized crop.")
    crop_scale_min: float = Field(0.35, gt=0, le=1, description="Smallest area fraction of a random resized crop.")
    hflip: bool = Field(False, description="Training augmentation: random horizontal flip.")
    auto_augment: Literal["none", "trivial", "randaugment"] = Field(
        "none", description="Training augmentation policy: TrivialAugmentWide or RandAugment.")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude.")


class BackboneOptions(TaskOptions):
    """``[task]`` keys of every image-level task: the backbone's initialisation and the BatchNorm fold."""

    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': the same architecture from random initialisation (a from-scratch "
                                  "baseline; use with peft.method = 'full').")
    fold_batchnorm: bool = Field(
        True, description="With LoRA or a linear probe, compute each frozen BatchNorm folded into the frozen "
                          "convolution before it (the same function, ~1.4x faster training of MobileNet-style CNNs "
                          "on CPU; float rounding differs). The adapter and the saved model are unchanged.")


class ImageBackboneTask(ImagePredictInput, FrozenBatchNormTask, Task):
    """A Task on a timm or transformers image backbone with a head of ``len(self.state["labels"])`` outputs.

    Subclasses set ``data_options`` to a subclass of :class:`ImageData` and ``task_options`` to one of
    :class:`BackboneOptions`, and implement the data, loss, metrics and ``predict`` (with
    :meth:`_image_logits`)."""

    library_name = "peft"

    # -- data ----------------------------------------------------------
    def _drop_bad_images(self, df: Any, key: str, where: Any = None):
        """``(df without its unreadable images, their paths)``; with ``data.on_bad_image = "fail"`` a
        DataError listing them (and, given ``where(row_index) -> str``, their rows) instead."""
        bad = check_images(image_sources(df), df["image"].tolist())
        if not bad:
            return df, []
        rows = {}
        if where is not None:
            position = {name: i for i, name in enumerate(df["image"].tolist())}
            rows = {p: f"{where(position[p])}: " for p, _ in bad if p in position}
        shown = "; ".join(f"{rows.get(p, '')}{p} ({why})" for p, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
        if self.recipe.data.on_bad_image == "fail":
            raise DataError(f"{key}: {len(bad)} of {len(df)} image(s) are missing or unreadable: {shown}. Fix or "
                            "remove them, or set data.on_bad_image = \"skip\" to train without them.")
        print(f"warning: {key}: skipping {len(bad)} of {len(df)} unreadable image(s): {shown}", file=sys.stderr)
        names = {p for p, _ in bad}
        return df[~df["image"].isin(names)].reset_index(drop=True), [p for p, _ in bad]

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        import torch

        # A random-init network with frozen BatchNorm statistics produces subnormal floats that halve CPU speed.
        torch.set_flush_denormal(True)
        from finetune_vision.models import load_backbone_model

        data = self.recipe.data
        model, processor, facts = load_backbone_model(backbone, self.state["labels"], self.recipe.task.init,
                                                      data.image_size, data.crop_pct)
        self.state.update(facts)
        # more than one convolution (a ViT has one, its patch embedding): a CNN, fed channels-last input
        self._channels_last = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1
        return model, processor

    def lora_targets(self, model: Any) -> list[str]:
        import torch.nn as nn

        heads = set(self.modules_to_save(model))

        def in_head(name: str) -> bool:
            return any(name == h or name.startswith(h + ".") for h in heads)

        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not in_head(n)]
        if linears:  # transformer-style (ViT, ConvNeXt, MLP-Mixer...): attention and MLP projections
            return linears
        convs = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == 1 and not in_head(n)]
        if convs:  # CNNs: every non-depthwise convolution (for MobileNets: the pointwise ones and the stem)
            return convs
        raise RecipeError("peft.target_modules: found no Linear or (non-depthwise) Conv2d layer outside the head; "
                          "set peft.target_modules to module names of this model.")

    def modules_to_save(self, model: Any) -> list[str]:
        from finetune_vision.models import head_module_names

        return head_module_names(model)

    def _fold_batchnorm(self, model: Any, pixel_values: Any) -> None:
        """On a model's first batch: fold its frozen BatchNorms into their convolutions
        (finetune_vision.batchnorm_fold); the count is kept on the model."""
        model._finetune_batchnorm_folded = 0  # set first: the fold's own forward passes come back here
        from finetune_vision.batchnorm_fold import fold_batchnorm

        probe = pixel_values[:2]
        folded, found = fold_batchnorm(model, lambda: self._logits(model, probe))
        model._finetune_batchnorm_folded = folded
        if found and not folded:
            print(f"warning: task.fold_batchnorm: the folded model's output differs from the unfolded one on the "
                  f"first batch, so its {found} BatchNorm layers are computed separately (slower, same results)",
                  file=sys.stderr)

    def _logits(self, model: Any, pixel_values: Any) -> Any:
        if getattr(model, "_finetune_batchnorm_folded", None) is None and self._folds_batchnorm():
            self._fold_batchnorm(model, pixel_values)
        if getattr(self, "_channels_last", False):
            # oneDNN's convolutions (and their backward) run ~1.2-1.3x faster on channels-last input on CPU
            # (MobileNetV2 at 96 px, measured); only the input is converted, the weights stay as saved
            import torch

            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        # e.g. interpolate_pos_encoding=True for a transformers ViT at a non-native image size
        out = model(pixel_values, **(self.state.get("forward_kwargs") or {}))
        return getattr(out, "logits", out)

    # -- export --------------------------------------------------------
    export_formats = ("onnx", "safetensors")

    def export_graph(self, model: Any, processor: Any, batch: dict[str, Any]) -> Any:
        """pixel_values [batch, 3, size, size] (normalised, as the eval transform makes them) -> logits; the batch
        axis dynamic. The forward is the plain model's (no BatchNorm fold, no channels-last)."""
        from finetune import ExportGraph
        from finetune_vision.export import PixelLogits, onnx_usage

        return ExportGraph(module=PixelLogits(model, self.state.get("forward_kwargs") or {}),
                           inputs={"pixel_values": batch["pixel_values"]},
                           usage=onnx_usage(self.state, self.export_thresholds()))

    def export_thresholds(self) -> list[float] | None:
        """Per-label thresholds for the card's decision (multi-label), or None (the most likely label)."""
        return None

    def export_file(self, fmt: str, model: Any, processor: Any, folder: Path,
                    options: dict[str, Any]) -> dict[str, Any]:
        """``safetensors``: a timm model in timm's Hub layout (config.json + model.safetensors, loads with
        ``timm.create_model('local-dir:FOLDER', pretrained=True)``), a transformers one with save_pretrained."""
        if fmt == "safetensors" and self.state.get("backend") == "timm":
            from finetune_vision.export import save_timm

            return save_timm(model, processor, folder, self.state)
        return super().export_file(fmt, model, processor, folder, options)

    # -- inference -----------------------------------------------------
    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        from finetune_vision.hf_datasets import is_datasets_input, predict_records

        if is_datasets_input(Path(path)):  # a save_to_disk folder, .parquet or .arrow: Image features, bytes or paths
            return predict_records(Path(path), self.recipe.data)
        return super().read_predict_input(path)  # an image, a folder of images or a table

    def _image_logits(self, model: Any, processor: Any, records: list[dict[str, Any]],
                      batch_size: int) -> list[tuple[dict[str, Any], Any, str | None]]:
        """Per record, in order: ``(record without encoded bytes, float logits on the CPU or None, why the
        image could not be read or None)``, the readable images run through the model in batches."""
        import torch

        column = self.recipe.data.image_column
        transform = processor.transform(training=False, options=self.recipe.data)
        device = next(model.parameters()).device
        out: list[tuple[dict[str, Any], Any, str | None]] = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            results: list[Any] = [None] * len(chunk)
            tensors, ok = [], []
            for position, record in enumerate(chunk):
                try:
                    tensors.append(transform(load_rgb(record.get("source", record[column]))))
                    ok.append(position)
                except Exception as exc:  # noqa: BLE001 - one bad file must not lose the others
                    results[position] = (shown_record(record), None, f"{type(exc).__name__}: {str(exc)[:120]}")
            if tensors:
                logits = self._logits(model, torch.stack(tensors).to(device)).float().cpu()
                for position, row in zip(ok, logits):
                    results[position] = (shown_record(chunk[position]), row, None)
            out += results
        return out


def shown_record(record: dict[str, Any]) -> dict[str, Any]:
    """A predict record without the encoded image bytes (not for output files)."""
    return {k: v for k, v in record.items() if k != "source"}


def image_sources(frame: Any) -> list[Any]:
    """Per row: the image file path, or encoded bytes (``source`` column, from a datasets source)."""
    return (frame["source"] if "source" in frame.columns else frame["image"]).tolist()


class ImageDataset:
    """Map-style dataset: ``{"pixel_values": transformed image, "labels": target}`` per image (path or bytes)."""

    def __init__(self, sources: list[Any], labels: list[Any], transform: Any, names: list[str]) -> None:
        self.sources, self.labels, self.transform, self.names = sources, labels, transform, names

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = load_rgb(self.sources[i])
        except Exception as exc:  # noqa: BLE001 - checked in prepare_data; changed on disk since
            raise DataError(f"image {self.names[i]} became unreadable during training "
                            f"({type(exc).__name__}: {exc}); fix it and resume with --resume.") from None
        return {"pixel_values": self.transform(image), "labels": self.labels[i]}
