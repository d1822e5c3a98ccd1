"""Generation with a (LoRA-adapted) causal LM: batched with left padding, or streamed token by token."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class Generated:
    text: str
    finish_reason: str  #: "stop" (an end token was generated) or "length" (max_new_tokens reached)
    new_tokens: int


def generation_kwargs(opts: Any, stop_ids: list[int], pad_id: int, max_new_tokens: int | None = None) -> dict:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or opts.max_new_tokens,
                              "eos_token_id": list(stop_ids), "pad_token_id": pad_id, "use_cache": True}
    if opts.temperature > 0:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p,
                      top_k=opts.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if opts.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = opts.repetition_penalty
    return kwargs


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], kwargs: dict[str, Any], batch_size: int = 8,
             stream_to: TextIO | None = None, seed: int | None = None) -> list[Generated]:
    """Generate a continuation for each prompt (token ids). With ``stream_to``, one prompt at a time
    and the new text is written there as it is produced."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = set(kwargs["eos_token_id"])
    pad = kwargs["pad_token_id"]
    out: list[Generated] = []
    if seed is not None:
        torch.manual_seed(seed)
    try:
        step = 1 if stream_to is not None else batch_size
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            extra = {}
            if stream_to is not None:
                extra["streamer"] = _Streamer(tokenizer, stream_to)
            with torch.no_grad():
                seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs, **extra)
            for row in seqs[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in stop), None)
                new = row if end is None else row[:end]
                out.append(Generated(text=tokenizer.decode(new, skip_special_tokens=True),
                                     finish_reason="length" if end is None else "stop",
                                     new_tokens=len(new) + (0 if end is None else 1)))
    finally:
        model.train(was_training)
    return out


def _Streamer(tokenizer: Any, stream: TextIO) -> Any:  # noqa: N802 - a factory; transformers imported lazily
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def default_stream() -> TextIO:
    """Streamed text goes to stderr: stdout stays the machine-readable JSON lines."""
    return sys.stderr


def generate_streaming(model: Any, tokenizer: Any, prompt: list[int], kwargs: dict[str, Any],
                       on_text: Any, seed: int | None = None) -> Generated:
    """Generate one continuation of ``prompt`` (token ids), KV-cached, calling ``on_text(piece)`` with each
    new piece of decoded text (held back while it ends inside a multi-byte character); generation stops
    at an end token, at ``max_new_tokens``, or as soon as ``on_text`` returns True (then the finish reason
    is "stop"). The pieces joined equal the returned text."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    stop_ids = set(kwargs["eos_token_id"])
    state = {"tokens": [], "sent": "", "ended": False, "halted": False}

    def push(final: bool = False) -> None:
        text = tokenizer.decode(state["tokens"], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        piece = text[len(state["sent"]):] if text.startswith(state["sent"]) else ""
        if piece:
            state["sent"] = text
            if on_text(piece):
                state["halted"] = True

    class Pieces(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            if state["ended"] or state["halted"]:
                return
            for token in value.reshape(-1).tolist():
                if token in stop_ids:
                    state["ended"] = True
                    return
                state["tokens"].append(token)
            push()

        def end(self) -> None:
            if not state["halted"]:
                push(final=True)

    class Halt(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            return torch.full((input_ids.shape[0],), state["halted"], dtype=torch.bool, device=input_ids.device)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    try:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Pieces(),
                       stopping_criteria=StoppingCriteriaList([Halt()]), **kwargs)
    finally:
        model.train(was_training)
    new = len(state["tokens"])
    reason = "stop" if state["ended"] or state["halted"] else "length"
    return Generated(text=state["sent"], finish_reason=reason, new_tokens=new + (1 if state["ended"] else 0))
