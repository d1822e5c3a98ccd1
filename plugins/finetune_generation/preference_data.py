"""Reading and encoding preference data: what preference tuning (DPO, ORPO, SimPO, KTO) and reward models share.

Paired data (DPO, ORPO, SimPO, reward models) has a ``prompt``, a ``chosen`` and a ``rejected`` answer per
row. Each may be plain text or chat messages (``[{"role": ..., "content": ...}, ...]``): a prompt given as
messages ends with a user turn; a chosen/rejected given as messages counts by its last assistant message.
The common Hub layout with no prompt column, where ``chosen`` and ``rejected`` are whole conversations
sharing their first turns, is read too: the prompt is their shared turns up to the last user turn.

Unpaired data (KTO) has a ``prompt``, a ``completion`` and a ``label`` saying whether the completion is
desirable (true/false, 1/0 or "desirable"/"undesirable"); it must hold both kinds.

:func:`encode_preference` renders a prompt and one answer exactly as supervised fine-tuning renders the
last assistant turn (:class:`finetune_generation.data.Encoder`): the prompt's tokens carry no label, the
answer's tokens and its end-of-turn token do. :func:`collate_preferences` batches chosen and rejected
rows into one right-padded batch (chosen rows first, then rejected), so one forward pass scores both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from finetune import DataError, DataOptions, PathStr, did_you_mean
from finetune_generation.data import IGNORE, ROLES, Encoder, Example, collate


class PreferenceData(DataOptions):
    train: PathStr | None = Field(
        None, description="Preference examples: a .jsonl file (one JSON object per line) or a .csv/.tsv/.json/"
        ".parquet table with `prompt`, `chosen` and `rejected` (text or chat messages; KTO: `prompt`, `completion` "
        "and `label`), or give `dataset`.")
    eval: PathStr | None = Field(None, description="Evaluation examples of the same layout as `train`; if absent, "
                                 "`split` of train is held out.")
    test: PathStr | None = Field(None, description="Test examples of the same layout as `train`: scored once at the "
                                 "end with the selected adapter (test.* in metrics.json), never used for selection.")
    prompt_column: str = Field("prompt", description="Field holding the prompt: text, or chat messages ending with a "
                               "user turn. May be absent when `chosen` and `rejected` are whole conversations "
                               "sharing their prompt turns.")
    chosen_column: str = Field("chosen", description="Field holding the preferred answer: text, or chat messages "
                               "(the last assistant message is the answer).")
    rejected_column: str = Field("rejected", description="Field holding the dispreferred answer: text, or chat "
                                 "messages (the last assistant message is the answer).")
    completion_column: str = Field("completion", description="KTO (unpaired data): field holding the single "
                                   "completion of a prompt.")
    label_column: str = Field("label", description="KTO (unpaired data): field saying whether the completion is "
                              "desirable: true/false, 1/0 or \"desirable\"/\"undesirable\".")
    max_length: int = Field(512, gt=1, le=131072, description="Tokens per prompt + answer; longer ones are cut on "
                            "the right (reported); a pair whose answer is cut away entirely is left out.")


@dataclass
class PreferenceExample:
    """One preference row. ``prompt`` holds the prompt only (``messages`` ending with a user turn, or
    ``prompt``/``plain_prompt`` text); paired rows fill ``chosen``/``rejected``, KTO rows ``completion`` and
    ``desirable``."""

    where: str  #: file and line (or data set and row), for messages
    prompt: Example
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None  #: KTO
    desirable: bool | None = None  #: KTO
    record: dict[str, Any] = field(default_factory=dict)  #: the row's fields as read


# ---------------------------------------------------------------------------
# reading

_TRUE = {"true", "1", "desirable", "yes"}
_FALSE = {"false", "0", "undesirable", "no"}


def read_preferences(records: list[tuple[str, dict[str, Any]]], data: Any, key: str,
                     unpaired: bool) -> list[PreferenceExample]:
    """Validate ``(location, record)`` pairs (as :func:`finetune_generation.data.read_records` gives them)
    and turn them into :class:`PreferenceExample` objects: paired (prompt, chosen, rejected) or, with
    ``unpaired``, KTO rows (prompt, completion, label). Raises :class:`finetune.DataError` naming ``key``,
    the file and the line."""
    out = [(_unpaired if unpaired else _paired)(rec, data, where, key) for where, rec in records]
    if unpaired and out:
        kinds = {ex.desirable for ex in out}
        if len(kinds) == 1:
            only = "desirable" if kinds.pop() else "undesirable"
            source = records[0][0].rsplit(": ", 1)[0]
            raise DataError(f"{key}: {source}: every one of the {len(out)} examples is labelled {only} "
                            f"(field {data.label_column!r}); KTO needs both desirable and undesirable completions "
                            "to learn from. Add examples of the other kind (or use paired data with another "
                            "task.objective).")
    return out


def _missing(rec: dict[str, Any], column: str, ckey: str, where: str, key: str, extra: str = "") -> DataError:
    fields = ", ".join(repr(c) for c in rec) or "none"
    return DataError(f"{key}: {where}: field {column!r} ({ckey}) is missing{did_you_mean(column, list(rec))} "
                     f"(fields here: {fields}).{extra} Add the field, or set {ckey} to the field's name.")


def _paired(rec: dict[str, Any], data: Any, where: str, key: str) -> PreferenceExample:
    for column, ckey in ((data.chosen_column, "data.chosen_column"), (data.rejected_column, "data.rejected_column")):
        if rec.get(column) is None:
            raise _missing(rec, column, ckey, where, key)
    chosen_raw, rejected_raw = rec[data.chosen_column], rec[data.rejected_column]
    if rec.get(data.prompt_column) is not None:
        prompt = _prompt(rec[data.prompt_column], data.prompt_column, where, key)
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        prompt = _shared_prompt(chosen_raw, rejected_raw, data, where, key)
    else:
        raise _missing(rec, data.prompt_column, "data.prompt_column", where, key,
                       " Without a prompt field, `chosen` and `rejected` must both be chat conversations that "
                       "share their prompt turns.")
    chosen = _answer(chosen_raw, data.chosen_column, "data.chosen_column", where, key)
    rejected = _answer(rejected_raw, data.rejected_column, "data.rejected_column", where, key)
    if chosen.strip() == rejected.strip():
        raise DataError(f"{key}: {where}: the chosen and rejected answers are identical ({_short(chosen)!r}), so "
                        "there is nothing to prefer; fix the pair or remove the line.")
    return PreferenceExample(where=where, prompt=prompt, chosen=chosen, rejected=rejected, record=rec)


def _unpaired(rec: dict[str, Any], data: Any, where: str, key: str) -> PreferenceExample:
    for column, ckey in ((data.prompt_column, "data.prompt_column"), (data.completion_column, "data.completion_column"),
                         (data.label_column, "data.label_column")):
        if rec.get(column) is None:
            raise _missing(rec, column, ckey, where, key)
    prompt = _prompt(rec[data.prompt_column], data.prompt_column, where, key)
    completion = _answer(rec[data.completion_column], data.completion_column, "data.completion_column", where, key)
    return PreferenceExample(where=where, prompt=prompt, completion=completion,
                             desirable=_label(rec[data.label_column], data.label_column, where, key), record=rec)


def _label(value: Any, column: str, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{key}: {where}: field {column!r} (data.label_column) is {value!r}; a KTO label says whether "
                    "the completion is desirable: true/false, 1/0 or \"desirable\"/\"undesirable\".")


def _prompt(value: Any, column: str, where: str, key: str) -> Example:
    if isinstance(value, list):
        messages = _turns(value, column, where, key)
        if not messages or messages[-1]["role"] != "user":
            last = messages[-1]["role"] if messages else "nothing"
            raise DataError(f"{key}: {where}: the prompt messages in {column!r} (data.prompt_column) end with "
                            f"{last}; a prompt ends with a user turn (the answers are in the chosen/rejected or "
                            "completion fields).")
        return Example(where=where, messages=messages)
    text = _string(value, column, "data.prompt_column", where, key)
    return Example(where=where, prompt=text, plain_prompt=text)


def _answer(value: Any, column: str, ckey: str, where: str, key: str) -> str:
    if isinstance(value, list):
        messages = _turns(value, column, where, key)
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise DataError(f"{key}: {where}: the messages in {column!r} ({ckey}) hold no assistant message; the "
                            "answer is the last assistant message.")
        value = answers[-1]["content"]
        if not value.strip():
            raise DataError(f"{key}: {where}: the last assistant message in {column!r} ({ckey}) is empty; an answer "
                            "needs text (fill it or remove the line).")
        return value
    return _string(value, column, ckey, where, key)


def _string(value: Any, column: str, ckey: str, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{key}: {where}: field {column!r} ({ckey}) must be text or a list of chat messages, got "
                        f"{type(value).__name__}.")
    text = str(value)
    if not text.strip():
        raise DataError(f"{key}: {where}: field {column!r} ({ckey}) is empty; an example needs text there (fill it "
                        "or remove the line).")
    return text


def _turns(value: list[Any], column: str, where: str, key: str) -> list[dict[str, str]]:
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"{key}: {where}: message {i} of {column!r} is not an object with \"role\" and text "
                            "\"content\".")
        if turn.get("role") not in ROLES:
            raise DataError(f"{key}: {where}: message {i} of {column!r} has role {turn.get('role')!r}; expected one "
                            f"of {', '.join(ROLES)}.")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _shared_prompt(chosen: list[Any], rejected: list[Any], data: Any, where: str, key: str) -> Example:
    a = _turns(chosen, data.chosen_column, where, key)
    b = _turns(rejected, data.rejected_column, where, key)
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    users = [i for i in range(shared) if a[i]["role"] == "user"]
    if not users:
        raise DataError(f"{key}: {where}: there is no prompt field ({data.prompt_column!r}, data.prompt_column) and "
                        "the chosen and rejected conversations share no user turn to take the prompt from. Add a "
                        "prompt field, or give both conversations with the same prompt turns first.")
    return Example(where=where, messages=a[: users[-1] + 1])


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def preference_splits(recipe: Any, unpaired: bool, info: dict[str, Any] | None = None) -> Any:
    """``finetune.DataSplits`` of :class:`PreferenceExample` for a task's ``prepare_data``: ``data.train`` (any
    file :func:`finetune_generation.data.read_records` reads) or ``data.dataset`` (:func:`finetune.open_dataset`),
    then ``data.test_split``, ``data.limit``, ``data.eval`` or ``data.split`` and ``data.test``, as the
    ``causal-lm`` task applies them. Facts (sizes, the data set) are added to ``info``."""
    import random

    from finetune import DataSplits, open_dataset
    from finetune_generation.data import clean_record, read_records

    data, info = recipe.data, {} if info is None else info
    seed = recipe.train.seed
    train = eval_ = test = None

    def read(path: Any, key: str) -> list[PreferenceExample]:
        return read_preferences(read_records(str(path), data.format, key), data, key, unpaired)

    if data.dataset:
        source = open_dataset(data, recipe.source.parent if recipe.source else None)
        info.update(source.info)

        def rows(part: Any, key: str) -> list[PreferenceExample]:
            records = [(f"{part.where}: row {i + 1}", clean_record(r)) for i, r in enumerate(part.frame().to_dict("records"))]
            return read_preferences(records, data, key, unpaired)

        train_split, eval_split = source.train_and_eval(data)
        train = rows(train_split, "data.dataset_split")
        eval_ = rows(eval_split, "data.dataset_eval_split") if eval_split is not None else None
        test_split = source.test_split(data)
        test = rows(test_split, "data.dataset_test_split") if test_split is not None else None
    else:
        train = read(data.train, "data.train")
    if data.test_split:
        train, test = hold_out(train, data.test_split, seed, "data.test_split", data.group_column)
    if data.limit:
        train = random.Random(seed).sample(train, min(data.limit, len(train)))
    if eval_ is None and data.eval:
        eval_ = read(data.eval, "data.eval")
    if eval_ is None:
        train, eval_ = hold_out(train, data.split, seed, "data.split", data.group_column)
    if data.test:
        test = read(data.test, "data.test")
    if unpaired:  # each split of KTO data must hold both kinds (the held-out part too)
        for split, part in (("train", train), ("eval", eval_)):
            if len({ex.desirable for ex in part}) == 1:
                raise DataError(f"data.split: the {split} split holds only "
                                f"{'desirable' if part[0].desirable else 'undesirable'} examples; KTO needs both. "
                                "Give data.eval with both kinds, or add examples.")
    info.update(train_examples=len(train), eval_examples=len(eval_))
    if test is not None:
        info["test_examples"] = len(test)
    return DataSplits(train=train, eval=eval_, info=info, test=test)


def hold_out(examples: list[Any], fraction: float, seed: int, key: str,
             group: str | None = None) -> tuple[list[Any], list[Any]]:
    """``(kept, held_out)``: ``fraction`` of the examples, chosen by a shuffle seeded by ``seed``. With
    ``group`` (``data.group_column``), rows sharing that field's value (e.g. pairs of one prompt) stay on
    the same side: ``fraction`` of the groups is held out."""
    import json
    import random

    other = "data.test" if key == "data.test_split" else "data.eval"
    if group is None:
        labels = list(range(len(examples)))
    else:
        labels = []
        for ex in examples:
            if ex.record.get(group) is None:
                raise DataError(f"data.group_column: {ex.where}: field {group!r} is missing"
                                f"{did_you_mean(group, list(ex.record))}; every row needs it to keep its group on "
                                "one side of the split.")
            labels.append(json.dumps(ex.record[group], sort_keys=True))
    order = list(dict.fromkeys(labels))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * fraction))
    if n_held >= len(order):
        raise DataError(f"{key}: holding out {fraction} of {len(order)} {'groups' if group else 'examples'} leaves "
                        f"no training data; add examples or give {other}.")
    held = set(order[:n_held])
    return ([ex for ex, g in zip(examples, labels) if g not in held],
            [ex for ex, g in zip(examples, labels) if g in held])


# ---------------------------------------------------------------------------
# encoding and batching

def encode_preference(encoder: Encoder, prompt: Example, answer: str,
                      max_length: int) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` of a prompt followed by one answer, rendered as supervised fine-tuning renders
    the last assistant turn (chat template or plain prompt + answer + EOS): labels are ``IGNORE`` on the
    prompt (earlier assistant turns of a chat prompt included) and the token itself on the answer and its
    end-of-turn token. Right-truncated to ``max_length``; ``None`` when no answer token is left."""
    if prompt.messages is not None:
        example = Example(where=prompt.where, messages=[*prompt.messages, {"role": "assistant", "content": answer}])
    else:
        example = Example(where=prompt.where, prompt=prompt.prompt, plain_prompt=prompt.plain_prompt,
                          completion=answer)
    pieces = encoder.segments(example)
    last = max(i for i, (_, learned) in enumerate(pieces) if learned)  # the final answer's tokens (+ end token)
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (ids, _) in enumerate(pieces):
        input_ids += ids
        labels += ids if i == last else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels[1:]):  # label 0 is never predicted
        return None
    return input_ids, labels


def collate_preferences(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch encoded preference items.

    Paired items (``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``,
    ``index``) give ONE right-padded ``input_ids``/``attention_mask``/``labels`` of ``2B`` rows, the chosen
    rows first and the rejected rows after them (row ``i`` and ``B + i`` are a pair), so one forward pass
    scores both; ``index`` (LongTensor ``[B]``) comes first in the dict, so the core counts ``B`` examples.
    KTO items (``input_ids``, ``labels``, ``desirable``, ``index``) give ``B`` rows and a ``desirable`` bool
    tensor ``[B]``. Any other per-item integer field (e.g. ``split``) is kept as a LongTensor ``[B]``."""
    import torch

    out: dict[str, Any] = {"index": torch.tensor([int(x["index"]) for x in items], dtype=torch.long)}
    if "chosen_input_ids" in items[0]:
        rows = ([{"input_ids": x["chosen_input_ids"], "labels": x["chosen_labels"]} for x in items]
                + [{"input_ids": x["rejected_input_ids"], "labels": x["rejected_labels"]} for x in items])
        out.update(collate(rows, pad_id))
        skip = {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}
    else:
        out.update(collate([{"input_ids": x["input_ids"], "labels": x["labels"]} for x in items], pad_id))
        out["desirable"] = torch.tensor([bool(x["desirable"]) for x in items], dtype=torch.bool)
        skip = {"input_ids", "labels", "desirable", "index"}
    for name in items[0]:
        if name not in skip and isinstance(items[0][name], int):
            out[name] = torch.tensor([int(x[name]) for x in items], dtype=torch.long)
    return out


__all__ = ["PreferenceData", "PreferenceExample", "collate_preferences", "encode_preference", "hold_out",
           "preference_splits", "read_preferences"]
