"""Frozen-prefix cache: compute the frozen bottom layers of a transformer once per example.

When LoRA sits only in the top layers (``peft.layers``), the embeddings and the layers
below the lowest LoRA layer never change during training. Their output for an example is
then the same every epoch, provided nothing random touches them: the cache runs them in
eval mode (no dropout) and stores each example's hidden states (unpadded). Every later
forward pass feeds the cached states straight into the first trainable layer, so neither
the forward nor the backward pass goes through the frozen prefix again.

This changes results slightly compared with training without the cache (the frozen layers'
dropout is off), which is why it is opt-in and reported by ``finetune validate`` and in
run.json. It works for Hugging Face encoders whose backbone has an ``embeddings`` module
followed by a ModuleList of layers (BERT, RoBERTa, MiniLM, ELECTRA, DistilBERT, ...) and whose
batches carry an attention mask (padding positions are masked, so padding a cached example
to a batch's width does not change the real positions).

Use from a task: give every example a unique integer id in the batch (key :attr:`ID_KEY`;
e.g. ``i`` for training examples and ``-1 - i`` for eval examples), call :meth:`train_mode`
from ``Task.train_mode`` and :meth:`forward` from ``training_loss`` / ``evaluation_step``.
"""

from __future__ import annotations

from typing import Any

from finetune import RecipeError, transformer_layers

ID_KEY = "example_id"


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the prefix output is captured."""


class FrozenPrefixCache:
    """Caches the output of the embeddings and layers ``0 .. first_trainable - 1``.

    ``model`` may be the PEFT-wrapped model (or one wrapped again by DDP); the cache finds
    the transformers backbone inside it. ``first_trainable`` must be at least 1.
    """

    ID_KEY = ID_KEY

    def __init__(self, model: Any, first_trainable: int) -> None:
        import torch

        inner = _unwrap(model)
        backbone = getattr(inner, "base_model", inner)  # transformers: the encoder inside a *For* model
        embeddings = getattr(backbone, "embeddings", None)
        if not isinstance(embeddings, torch.nn.Module):
            raise RecipeError("the frozen-prefix cache needs an encoder with an 'embeddings' module "
                              f"({type(backbone).__name__} has none); turn the cache off.")
        qualified, attr, stack = transformer_layers(backbone)
        if not 1 <= first_trainable < len(stack):
            raise RecipeError(f"the frozen-prefix cache needs LoRA above layer 0 and below the top "
                              f"(lowest LoRA layer {first_trainable} of {len(stack)}); set peft.layers to "
                              "the top layers, e.g. [-2, -1].")
        frozen = [embeddings, *list(stack)[:first_trainable]]
        moving = [n for m in frozen for n, p in m.named_parameters() if p.requires_grad]
        if moving:
            raise RecipeError(f"the frozen-prefix cache needs the layers below {first_trainable} frozen, but "
                              f"{moving[:3]} are trained; move peft.layers up or turn the cache off.")
        self.backbone = backbone
        self.first_trainable = first_trainable
        self.frozen = frozen
        self._holder = backbone.get_submodule(qualified.rsplit(".", 1)[0]) if "." in qualified else backbone
        self._attr = attr
        self._full = stack
        self._top = torch.nn.ModuleList(list(stack)[first_trainable:])  # shares the layer modules
        self._stub = _embedded_stub()
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def train_mode(self, model: Any) -> None:
        """``model.train()``, with the frozen prefix in eval mode (no dropout)."""
        model.train()
        for module in self.frozen:
            module.eval()

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        """``model(**batch)`` with the frozen prefix taken from the cache (filled on first sight)."""
        batch = dict(batch)
        ids = batch.pop(ID_KEY, None)
        if ids is None:
            raise RecipeError(f"frozen-prefix cache: the batch has no {ID_KEY!r} key; the task must number its "
                              "examples when the cache is on.")
        ids = ids.tolist()
        mask = batch.get("attention_mask")
        if mask is None:
            raise RecipeError("frozen-prefix cache: the batch has no attention_mask, so padding a cached example "
                              "would change its result; turn the cache off.")
        lengths = mask.sum(dim=1).tolist()
        missing = [j for j, i in enumerate(ids) if i not in self._cache]
        if missing:
            self._fill(model, batch, missing, ids, lengths)
        width = mask.shape[1]
        first = self._cache[ids[0]]
        hidden = first.new_zeros((len(ids), width, first.shape[-1]))
        for j, i in enumerate(ids):
            cached = self._cache[i]
            hidden[j, :cached.shape[0]] = cached
        self._stub.hidden = hidden.to(mask.device)
        modules = self.backbone._modules
        embeddings, modules["embeddings"] = modules["embeddings"], self._stub
        self._holder._modules[self._attr] = self._top
        try:
            return model(**batch)
        finally:
            modules["embeddings"] = embeddings
            self._holder._modules[self._attr] = self._full
            self._stub.hidden = None

    def _fill(self, model: Any, batch: dict[str, Any], rows: list[int], ids: list[int], lengths: list[int]) -> None:
        import torch

        captured: list[Any] = []

        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        sub = {k: (v[rows] if hasattr(v, "shape") and v.ndim and v.shape[0] == len(ids) else v)
               for k, v in batch.items() if k != "labels"}
        training = [m.training for m in self.frozen]
        for m in self.frozen:
            m.eval()
        handle = self._full[self.first_trainable].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                self.backbone(**sub)
        except _Stop:
            pass
        finally:
            handle.remove()
            for m, was in zip(self.frozen, training):
                m.train(was)
        if not captured:
            raise RecipeError("frozen-prefix cache: the backbone never reached the first trainable layer; "
                              "turn the cache off.")
        hidden = captured[0].detach()
        mask = sub["attention_mask"]
        if not all(bool(mask[k, :lengths[j]].all()) for k, j in enumerate(rows)):
            raise RecipeError("frozen-prefix cache: batches are padded on the left; the cache needs right "
                              "padding (tokenizer.padding_side = 'right') or turn the cache off.")
        for k, j in enumerate(rows):
            self._cache[ids[j]] = hidden[k, :lengths[j]].clone()


def _embedded_stub() -> Any:
    """A module standing in for the embeddings: returns the batch's cached hidden states."""
    import torch

    class CachedPrefix(torch.nn.Module):
        hidden: Any = None

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.hidden

    return CachedPrefix()


def _unwrap(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model
