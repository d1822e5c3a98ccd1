"""The module :func:`finetune.contract.task.named_inputs_graph` wraps a model in for ``finetune export --format
onnx`` (imports torch: loaded only when a task builds its export graph)."""

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
