"""The module ``finetune export --format onnx`` traces for the audio classification task (imports torch)."""

from __future__ import annotations

from typing import Any

import torch


class NamedInputsLogits(torch.nn.Module):
    """``model(**named inputs).logits`` with the inputs by position, as ``torch.onnx.export`` passes them."""

    def __init__(self, model: Any, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: Any) -> Any:
        return self.model(**dict(zip(self.names, tensors))).logits
