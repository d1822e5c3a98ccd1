"""Reading instruction data in its common shapes, and turning it into token ids with a loss mask.

Shapes (``[data] shape``, detected from the columns when ``"auto"``):

* ``messages``: a list of ``{"role": ..., "content": ...}`` turns (chat);
* ``prompt_completion``: a prompt and the completion to learn;
* ``alpaca``: instruction / optional input / output;
* ``text``: plain text for continued pre-training (every token is learned).

Every example becomes a :class:`Example`; :func:`encode` renders it (through the
backbone's chat template when there is one) into ``input_ids`` and ``labels``
where ``-100`` marks the tokens that carry no loss. Pieces are tokenized one by
one (prompt part, then completion part) so the mask is exact and the prompt's
tokens at training time are the very tokens :func:`prompt_ids` gives at
generation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import DataError, RecipeError, load_table, read_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclass
class Example:
    """One normalised example. ``where`` names its file and line (or row) for error messages."""

    where: str
    messages: list[dict[str, str]] | None = None  #: chat turns (shape messages)
    prompt: str | None = None  #: user prompt (prompt_completion, alpaca)
    completion: str | None = None
    plain_prompt: str | None = None  #: the prompt rendered without a chat template (alpaca format)
    text: str | None = None  #: plain text (shape text)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# reading

def read_records(path: str, fmt: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    """``(location, record)`` pairs. JSONL is read line by line so errors name the real line number."""
    p = Path(path)
    kind = fmt if fmt != "auto" else {".jsonl": "jsonl", ".ndjson": "jsonl"}.get(p.suffix.lower(), "other")
    if kind != "jsonl":
        df = load_table(p, fmt, key=key)  # csv/tsv/json/parquet: the core reader and its errors
        offset = 2 if str(p).lower().endswith((".csv", ".tsv")) else 1
        label = "line" if offset == 2 else "row"
        return [(f"{p}: {label} {i + offset}", clean_record(rec)) for i, rec in enumerate(df.to_dict(orient="records"))]
    return [(f"{p}: line {number}", record) for number, record in read_jsonl(p, key)]


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """pandas gives NaN for missing cells and numpy arrays for lists; make them None / lists."""
    out = {}
    for k, v in record.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, float) and v != v:
            v = None
        out[str(k)] = v
    return out


def detect_shape(data: Any, columns: set[str], path: str, key: str) -> str:
    if data.shape != "auto":
        return data.shape
    if data.messages_column in columns:
        return "messages"
    if data.prompt_column in columns and data.completion_column in columns:
        return "prompt_completion"
    if data.instruction_column in columns and data.output_column in columns:
        return "alpaca"
    if data.text_column in columns:
        return "text"
    found = ", ".join(repr(c) for c in sorted(columns)) or "none"
    raise DataError(
        f"{key}: {path}: cannot tell the data shape from its fields ({found}). Expected one of: "
        f"{data.messages_column!r} (chat messages), {data.prompt_column!r} + {data.completion_column!r}, "
        f"{data.instruction_column!r} + {data.output_column!r} (Alpaca style) or {data.text_column!r} "
        "(plain text). Rename the fields, or set data.shape and the data.*_column keys to your field names.")


def normalise(records: list[tuple[str, dict[str, Any]]], data: Any, shape: str, key: str) -> list[Example]:
    """Validate records of one shape and turn them into :class:`Example` objects."""
    out = []
    for where, rec in records:
        if shape == "messages":
            out.append(Example(where=where, messages=_messages(rec, data.messages_column, where, key)))
        elif shape == "prompt_completion":
            prompt = _text(rec, data.prompt_column, "data.prompt_column", where, key)
            completion = _text(rec, data.completion_column, "data.completion_column", where, key)
            out.append(Example(where=where, prompt=prompt, completion=completion, plain_prompt=prompt))
        elif shape == "alpaca":
            instruction = _text(rec, data.instruction_column, "data.instruction_column", where, key)
            output = _text(rec, data.output_column, "data.output_column", where, key)
            extra = rec.get(data.input_column)
            extra = "" if extra is None else str(extra).strip()
            out.append(Example(where=where, prompt=alpaca_user_prompt(instruction, extra), completion=output,
                               plain_prompt=alpaca_plain_prompt(instruction, extra)))
        else:
            out.append(Example(where=where, text=_text(rec, data.text_column, "data.text_column", where, key)))
    return out


def alpaca_user_prompt(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca_plain_prompt(instruction: str, extra: str) -> str:
    return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if extra else "",
                                instruction=instruction, input_block=f"### Input:\n{extra}\n\n" if extra else "")


def _text(rec: dict[str, Any], column: str, ckey: str, where: str, key: str) -> str:
    if column not in rec or rec[column] is None:
        found = ", ".join(repr(c) for c in rec) or "none"
        raise DataError(f"{key}: {where}: field {column!r} ({ckey}) is missing (fields here: {found}); add it "
                        f"or set {ckey}.")
    value = rec[column]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{key}: {where}: field {column!r} ({ckey}) must be a string, got "
                        f"{type(value).__name__}.")
    value = str(value)
    if not value.strip():
        raise DataError(f"{key}: {where}: field {column!r} ({ckey}) is empty; an example needs text there "
                        "(fill it or remove the line).")
    return value


def _messages(rec: dict[str, Any], column: str, where: str, key: str) -> list[dict[str, str]]:
    value = rec.get(column)
    if not isinstance(value, list) or not value:
        raise DataError(f"{key}: {where}: field {column!r} (data.messages_column) must be a non-empty list of "
                        f"{{\"role\": ..., \"content\": ...}} objects, got {type(value).__name__}.")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{key}: {where}: message {i} is a {type(turn).__name__}, not an object with "
                            "\"role\" and \"content\".")
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            raise DataError(f"{key}: {where}: message {i} has no \"role\" (one of {', '.join(ROLES)}).")
        if role not in ROLES:
            raise DataError(f"{key}: {where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{key}: {where}: message {i} ({role}) has no text \"content\".")
        out.append({"role": role, "content": content})
    assistants = [m for m in out if m["role"] == "assistant"]
    if not assistants:
        raise DataError(f"{key}: {where}: no \"assistant\" message: there is nothing to learn in this "
                        "conversation (add the answer as an assistant turn, or remove the line).")
    if not assistants[-1]["content"].strip():
        raise DataError(f"{key}: {where}: the last assistant message is empty; an example needs an answer to "
                        "learn (fill it or remove the line).")
    if out[0]["role"] == "assistant":
        raise DataError(f"{key}: {where}: the conversation starts with an assistant message; it needs a user "
                        "(or system) message first.")
    return out


# ---------------------------------------------------------------------------
# encoding

@dataclass
class Encoder:
    """Renders examples with a tokenizer: chat template when present, else plain concatenation + EOS."""

    tokenizer: Any
    use_template: bool
    stop_ids: list[int]
    system_prompt: str | None = None
    train_on_all: bool = False

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja errors of user templates
            raise DataError(f"{where}: the chat template failed on this conversation "
                            f"({type(exc).__name__}: {exc}).") from None

    def _ids(self, text: str, special: bool = False) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if special and ids and ids[-1] in self.stop_ids and not text.endswith(self.tokenizer.eos_token or "\0"):
            ids = ids[:-1]  # tokenizers that append EOS themselves: the prompt must not end the text
        return ids

    def chat(self, example: Example) -> list[dict[str, str]]:
        if example.messages is not None:
            msgs = example.messages
        else:
            msgs = [{"role": "user", "content": example.prompt or ""}]
            if example.completion is not None:
                msgs.append({"role": "assistant", "content": example.completion})
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        return msgs

    def segments(self, example: Example) -> list[tuple[list[int], bool]]:
        """``(token ids, learned)`` pieces of one example, in order."""
        if example.text is not None:
            return [(self._ids(example.text, special=True) + [self.stop_ids[0]], True)]
        if not self.use_template:
            if example.messages is not None:
                raise RecipeError("task.chat_template: chat `messages` data needs a chat template, and this "
                                  "backbone's tokenizer has none; set task.chat_template (a Jinja template) or "
                                  "task.chat_template_file, or give the data as prompt/completion pairs.")
            prompt = example.plain_prompt if example.plain_prompt is not None else example.prompt
            return [(self._ids(prompt or "", special=True), False),
                    (self._ids(example.completion or "") + [self.stop_ids[0]], True)]
        msgs = self.chat(example)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs = msgs[: last + 1]
        pieces: list[tuple[list[int], bool]] = []
        done = ""
        for i, message in enumerate(msgs):
            if message["role"] != "assistant":
                continue
            before = self._render(msgs[:i], True, example.where)
            through = self._render(msgs[: i + 1], False, example.where)
            if not (before.startswith(done) and through.startswith(before)):
                raise RecipeError(
                    "task.chat_template: the chat template does not render a conversation as a growing prefix "
                    "(rendering the first turns is not a prefix of rendering more turns), so the assistant "
                    "tokens cannot be located exactly; use a template without such look-ahead "
                    "(task.chat_template).")
            pieces.append((self._ids(before[len(done):]), False))
            answer = self._ids(through[len(before):])
            stop = next((j for j, t in enumerate(answer) if t in self.stop_ids), None)
            if stop is None:
                if i == last:  # the template does not end the turn with EOS: add it so the model learns to stop
                    answer.append(self.stop_ids[0])
                pieces.append((answer, True))
            else:  # learn up to and including the end-of-turn token; what the template adds after it is not
                pieces += [(answer[: stop + 1], True), (answer[stop + 1:], False)]
            done = through
        return pieces

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, learned in self.segments(example):
            input_ids += ids
            labels += ids if (learned or self.train_on_all) else [IGNORE] * len(ids)
        return input_ids, labels

    def prompt_ids(self, example: Example) -> list[int]:
        """The tokens a model sees before it generates the answer (the same as in training)."""
        if example.text is not None:
            return self._ids(example.text, special=True)
        if not self.use_template:
            if example.messages is not None:
                raise RecipeError("task.chat_template: chat messages need a chat template; this tokenizer has "
                                  "none (set task.chat_template).")
            prompt = example.plain_prompt if example.plain_prompt is not None else example.prompt
            return self._ids(prompt or "", special=True)
        msgs = self.chat(example)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return self._ids(self._render(msgs, True, example.where))


def prompt_and_reference(example: Example) -> tuple[Example, str]:
    """The held-out prompt of an example (everything before its last answer) and that answer."""
    if example.text is not None:
        words = example.text.split(" ")
        cut = max(1, len(words) // 2)
        return Example(where=example.where, text=" ".join(words[:cut])), " " + " ".join(words[cut:])
    if example.messages is not None:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        return (Example(where=example.where, messages=example.messages[:last]),
                example.messages[last]["content"])
    return (Example(where=example.where, prompt=example.prompt, plain_prompt=example.plain_prompt),
            example.completion or "")


@dataclass
class EncodedData:
    items: list[dict[str, list[int]]]
    truncated: int = 0  #: examples cut at max_length
    dropped: int = 0  #: examples with no learned token left after truncation (left out)
    dropped_where: list[str] = field(default_factory=list)


def encode_all(examples: list[Example], encoder: Encoder, max_length: int) -> EncodedData:
    out = EncodedData(items=[])
    for example in examples:
        ids, labels = encoder.encode(example)
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]  # right truncation
        if all(t == IGNORE for t in labels[1:]):  # label 0 is never predicted (nothing before it)
            out.dropped += 1
            out.dropped_where.append(example.where)
            continue
        out.items.append({"input_ids": ids, "labels": labels})
    return out


# ---------------------------------------------------------------------------
# batching

class TokenDataset:
    """A map-style dataset of token-id dicts (``{"input_ids", "labels"[, "position_ids"]}`` for SFT; prompts,
    pairs... for the other generation tasks). ``lengths()`` gives each item's length in tokens: its
    ``input_ids`` by default, or what ``length(item)`` says (e.g. the longer of a pair's two rows)."""

    def __init__(self, items: list[dict[str, Any]], length: Any = None) -> None:
        self.items = items
        self.length = length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def lengths(self) -> list[int]:
        if self.length is not None:
            return [self.length(x) for x in self.items]
        return [len(x["input_ids"]) for x in self.items]


def pack(items: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """First-fit-decreasing packing of examples into rows of at most ``max_length`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every example: models whose attention
    mask is built from them (transformers' packed-sequence detection) keep the examples apart. The
    first label of every example is ignored so no example learns to predict the next one's start.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    packed = []
    for row in rows:
        ids, labels, positions = [], [], []
        for i in sorted(row):  # a fixed order inside the row
            ids += items[i]["input_ids"]
            labels += [IGNORE] + items[i]["labels"][1:]
            positions += list(range(len(items[i]["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded examples. Padding is never learned: its labels are -100 even when the
    pad token is the EOS token (so the EOS of every example stays learned)."""
    import torch

    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    packed = "position_ids" in items[0]
    extra = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n] = torch.tensor(x["input_ids"])
        labels[row, :n] = torch.tensor(x["labels"])
        if packed:
            # the padding tail is one more "sequence" with its own positions; no attention mask, so the
            # model builds its block-diagonal mask from the position ids
            extra[row, :n] = torch.tensor(x["position_ids"])
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": extra}
    return {"input_ids": ids, "attention_mask": extra, "labels": labels}
