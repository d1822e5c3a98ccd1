"""Preference data: reading (text, chat, the Hub layout without a prompt, KTO labels), the errors for bad rows,
the loss masks of encoded pairs (answer + end token only) and the batch layout (chosen rows, then rejected)."""

from __future__ import annotations

import pytest
from generation_fixtures import tiny_gpt2, tiny_llama  # noqa: F401

from finetune.errors import DataError
from finetune_generation.data import IGNORE, Encoder, Example
from finetune_generation.preference_data import (
    PreferenceData,
    collate_preferences,
    encode_preference,
    read_preferences,
)

DATA = PreferenceData(train="x.jsonl")


def rows(*records):
    return [(f"f.jsonl: line {i + 1}", r) for i, r in enumerate(records)]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_text_and_chat_pairs_are_read():
    out = read_preferences(rows(
        {"prompt": "add 1 and 2", "chosen": "3", "rejected": "4"},
        {"prompt": [user("hi"), bot("hello"), user("add 2 and 2")], "chosen": [bot("4")], "rejected": "5"},
    ), DATA, "data.train", unpaired=False)
    assert out[0].prompt.prompt == "add 1 and 2" and out[0].prompt.plain_prompt == "add 1 and 2"
    assert (out[0].chosen, out[0].rejected, out[0].where) == ("3", "4", "f.jsonl: line 1")
    assert out[1].prompt.messages == [user("hi"), bot("hello"), user("add 2 and 2")]
    assert (out[1].chosen, out[1].rejected) == ("4", "5")
    assert out[1].record["rejected"] == "5"


def test_hub_layout_without_prompt_takes_the_shared_turns_up_to_the_last_user_turn():
    chosen = [{"role": "system", "content": "be brief"}, user("q1"), bot("a1"), user("q2"), bot("good")]
    rejected = [{"role": "system", "content": "be brief"}, user("q1"), bot("a1"), user("q2"), bot("bad")]
    (ex,) = read_preferences(rows({"chosen": chosen, "rejected": rejected}), DATA, "data.train", unpaired=False)
    assert ex.prompt.messages == chosen[:4]
    assert (ex.chosen, ex.rejected) == ("good", "bad")


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("False", False), ("1", True),
    ("desirable", True), ("undesirable", False)])
def test_kto_labels(value, expected):
    out = read_preferences(rows({"prompt": "p", "completion": "c", "label": value},
                                {"prompt": "p", "completion": "d", "label": not expected}),
                           DATA, "data.train", unpaired=True)
    assert out[0].desirable is expected and out[0].completion == "c"


@pytest.mark.parametrize(("records", "unpaired", "fragments"), [
    ([{"prompt": "p", "chosen": "same", "rejected": " same "}], False,
     ["line 1", "identical", "nothing to prefer"]),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"}], False,
     ["line 2", "'chosen' (data.chosen_column) is empty"]),
    ([{"prompt": "p", "chosen": "a", "rejectd": "b"}], False,
     ["line 1", "'rejected' (data.rejected_column) is missing (did you mean 'rejectd'?)"]),
    ([{"question": "p", "chosen": "a", "rejected": "b"}], False, ["'prompt' (data.prompt_column) is missing"]),
    ([{"prompt": [user("q"), bot("a")], "chosen": "a", "rejected": "b"}], False, ["end with assistant"]),
    ([{"prompt": "p", "chosen": [user("q")], "rejected": "b"}], False, ["no assistant message"]),
    ([{"chosen": [user("x"), bot("a")], "rejected": [user("y"), bot("b")]}], False, ["share no user turn"]),
    ([{"prompt": "p", "completion": " ", "label": True}], True, ["'completion' (data.completion_column) is empty"]),
    ([{"prompt": "p", "completion": "c", "label": "maybe"}], True, ["'maybe'", "true/false"]),
    ([{"prompt": "p", "completion": "c", "label": 1}, {"prompt": "q", "completion": "d", "label": "desirable"}],
     True, ["f.jsonl", "desirable", "KTO needs both"]),
], ids=["identical", "empty-chosen", "missing-did-you-mean", "missing-prompt", "prompt-ends-with-answer",
        "no-assistant", "no-shared-prompt", "kto-empty", "kto-bad-label", "kto-one-kind"])
def test_bad_rows(records, unpaired, fragments):
    with pytest.raises(DataError) as info:
        read_preferences(rows(*records), DATA, "data.train", unpaired=unpaired)
    message = str(info.value)
    assert message.startswith("data.train: f.jsonl")
    for fragment in fragments:
        assert fragment in message, message


def _encoder(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok, Encoder(tokenizer=tok, use_template=bool(tok.chat_template), stop_ids=[tok.eos_token_id])


def test_masks_cover_only_the_answer_and_its_end_token_with_a_chat_template(tiny_llama):
    tok, enc = _encoder(tiny_llama)
    prompt = Example(where="w", messages=[user("add 1 and 2"), bot("1+2=3"), user("add 2 and 2")])
    ids, labels = encode_preference(enc, prompt, "2+2=4", 256)
    learned = [t for t in labels if t != IGNORE]
    assert tok.decode(learned) == "2+2=4<|im_end|>"  # the earlier assistant turn is prompt: not learned
    assert labels[: len(ids) - len(learned) - 1] == [IGNORE] * (len(ids) - len(learned) - 1)
    assert ids[: len(enc.prompt_ids(prompt))] == enc.prompt_ids(prompt)  # the tokens generation starts from
    text_prompt = Example(where="w", prompt="add 2 and 2", plain_prompt="add 2 and 2")
    ids2, labels2 = encode_preference(enc, text_prompt, "2+2=4", 256)
    assert tok.decode([t for t in labels2 if t != IGNORE]) == "2+2=4<|im_end|>"
    assert tok.decode(ids2).startswith("<|im_start|>user\nadd 2 and 2<|im_end|>\n<|im_start|>assistant\n")


def test_masks_with_a_plain_prompt_learn_the_answer_and_eos(tiny_gpt2):
    tok, enc = _encoder(tiny_gpt2)
    prompt = Example(where="w", prompt="add 2 and 2 ", plain_prompt="add 2 and 2 ")
    ids, labels = encode_preference(enc, prompt, "2+2=4", 256)
    assert tok.decode([t for t in labels if t != IGNORE]) == "2+2=4<|endoftext|>"
    assert tok.decode(ids) == "add 2 and 2 2+2=4<|endoftext|>"
    n_prompt = len(enc.prompt_ids(prompt))
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]


def test_truncation_keeps_answer_tokens_or_gives_none(tiny_gpt2):
    _, enc = _encoder(tiny_gpt2)
    prompt = Example(where="w", prompt="add 2 and 2 ", plain_prompt="add 2 and 2 ")
    n_prompt = len(enc.prompt_ids(prompt))
    ids, labels = encode_preference(enc, prompt, "2+2=4", n_prompt + 2)
    assert len(ids) == n_prompt + 2 and labels[-2:] == ids[-2:]
    assert encode_preference(enc, prompt, "2+2=4", n_prompt) is None


def test_collate_pairs_chosen_rows_first_then_rejected():
    items = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [IGNORE, 2, 3], "rejected_input_ids": [1, 4],
              "rejected_labels": [IGNORE, 4], "index": 7, "split": 1},
             {"chosen_input_ids": [5, 6], "chosen_labels": [IGNORE, 6], "rejected_input_ids": [5, 7, 8, 9],
              "rejected_labels": [IGNORE, IGNORE, 8, 9], "index": 2, "split": 1}]
    batch = collate_preferences(items, pad_id=0)
    assert next(iter(batch)) == "index"  # the core counts examples with the first tensor: B, not 2B
    assert batch["index"].tolist() == [7, 2] and batch["split"].tolist() == [1, 1]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [IGNORE, 6, IGNORE, IGNORE],
                                        [IGNORE, 4, IGNORE, IGNORE], [IGNORE, IGNORE, 8, 9]]


def test_collate_kto_rows():
    items = [{"input_ids": [1, 2], "labels": [IGNORE, 2], "desirable": True, "index": 0},
             {"input_ids": [3, 4, 5], "labels": [IGNORE, 4, 5], "desirable": False, "index": 1}]
    batch = collate_preferences(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 4, 5]]
    assert batch["desirable"].tolist() == [True, False] and batch["index"].tolist() == [0, 1]


def test_group_column_keeps_the_pairs_of_one_prompt_on_one_side():
    from finetune_generation.preference_data import hold_out

    records = [{"prompt": f"p{i // 2}", "chosen": "a", "rejected": f"b{i}"} for i in range(20)]
    examples = read_preferences(rows(*records), DATA, "data.train", unpaired=False)
    kept, held = hold_out(examples, 0.2, 0, "data.split", group="prompt")
    assert len(held) == 4 and len(kept) == 16  # 2 of 10 prompts, both pairs of each
    assert not {e.prompt.prompt for e in kept} & {e.prompt.prompt for e in held}
    with pytest.raises(DataError, match="data.group_column: f.jsonl: line 1: field 'promt' is missing"):
        hold_out(examples, 0.2, 0, "data.split", group="promt")
