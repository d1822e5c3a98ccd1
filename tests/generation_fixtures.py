"""Fixtures for the generation plugin: tiny randomly initialised Llama / GPT-2 models with real tokenizers
(byte-level BPE trained here in milliseconds), saved with save_pretrained, and small instruction data.

Import the fixtures into a test module: ``from generation_fixtures import tiny_llama, ...``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Tiny arithmetic instructions with a fixed answer format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "completion": f"{a}+{b}={a + b}"})
    return rows


def to_messages(rows: list[dict[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"add {a} and {b} {a}+{b}={a + b} user assistant system the a quick answer"
              for a in range(10) for b in range(10)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with a ChatML chat template; EOS is <|im_end|>, and the tokenizer has NO pad token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(specials), bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 without a chat template or pad token (plain prompt + completion + EOS)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(["<|endoftext|>"]),
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", make_qa_rows(64))


@pytest.fixture
def make_gen_recipe(tmp_path, tiny_llama, qa_jsonl):
    """Write a causal-lm recipe for a tiny model. ``task``/``data``/``train`` are TOML lines merged into
    those sections; ``backbone`` defaults to the tiny Llama."""

    def _make(*, task: str = "", data: str = "", train: str = "", backbone: Path | None = None,
              name: str = "recipe.toml", output: str | None = None) -> Path:
        import tomllib

        import tomli_w

        recipe = {
            "task": {"name": "causal-lm", "sample_prompts": 2, "sample_max_new_tokens": 8, "max_new_tokens": 8},
            "model": {"backbone": str(backbone or tiny_llama)},
            "data": {"train": str(qa_jsonl), "split": 0.25, "max_length": 64},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                      "log_every_steps": 2, "checkpoint_every_steps": 0, "seed": 0},
            "output": {"dir": output if output is not None else str(tmp_path / "run")},
        }
        for section, extra in (("task", task), ("data", data), ("train", train)):
            recipe[section].update(tomllib.loads(extra))
        path = tmp_path / name
        path.write_text(tomli_w.dumps(recipe))
        return path

    return _make
