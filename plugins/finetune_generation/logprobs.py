"""Log-probabilities of answer tokens: what preference tuning, GRPO and their reference passes share.

A batch is right- (or left-) padded ``input_ids`` / ``attention_mask`` with ``labels`` equal to the token
at the positions whose probability counts (the answer and its end token) and ``IGNORE`` (-100)
elsewhere, as :func:`finetune_generation.data.collate` builds them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from finetune_generation.data import IGNORE


def token_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """``(logps, mask)``, both ``[rows, length - 1]``: the log-probability of each next token under
    ``model`` and whether it counts (label != IGNORE). Positions that do not count hold 0."""
    import torch

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    index = target.masked_fill(~mask, 0).unsqueeze(-1)
    picked = torch.gather(logits, -1, index).squeeze(-1) - torch.logsumexp(logits, -1)
    return picked * mask, mask


def sequence_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """``(summed, counts)``, both ``[rows]``: the summed log-probability of each row's counted tokens
    and how many there are (divide for the per-token mean, where a method is length-normalised)."""
    logps, mask = token_logps(model, batch)
    return logps.sum(-1), mask.sum(-1)


def unwrap(model: Any) -> Any:
    """The PEFT model inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


@contextmanager
def reference(model: Any):
    """The reference model: the same weights with the LoRA adapter disabled, in eval mode (no dropout),
    without gradients. No second copy of the weights is made."""
    import torch

    peft_model = unwrap(model)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield peft_model
    finally:
        peft_model.train(was_training)


__all__ = ["reference", "sequence_logps", "token_logps", "unwrap"]
