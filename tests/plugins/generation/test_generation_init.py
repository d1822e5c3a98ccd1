"""`finetune init` on generation data: chat / prompt-completion / Alpaca / text (causal-lm, the shape found),
preference pairs (preference-tuning; reward-model offered), KTO, and what it says about GRPO."""

from __future__ import annotations

from fake_plugins import write_jsonl
from init_fixtures import init_and_read


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus 2?"},
                         {"role": "assistant", "content": f"{i} + 2 = {i + 2}"}]}


def test_chat_data_is_causal_lm_with_grpo_offered(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(12)])
    recipe, said = init_and_read(data, tmp_path / "r.toml")
    assert recipe["task"]["name"] == "causal-lm" and recipe["data"]["shape"] == "messages"
    assert recipe["model"]["backbone"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert any("also possible: --task grpo" in s and "cannot tell it apart" in s for s in said)
    recipe, _ = init_and_read(tmp_path / "chat.jsonl", tmp_path / "g.toml", task="grpo")
    assert recipe["task"]["name"] == "grpo" and recipe["task"]["rewards"] == {"exact-number": 1.0}
    assert "shape" not in recipe["data"]


def test_other_shapes(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Say hello {i}", "completion": f"Hi, friend {'o' * i}."}
                                             for i in range(8)])
    recipe, said = init_and_read(pc, tmp_path / "a.toml")
    assert recipe["data"]["shape"] == "prompt_completion"
    assert any("not offered as grpo" in s for s in said)
    alpaca = write_jsonl(tmp_path / "al.jsonl", [{"instruction": f"Name a colour {i}", "input": "", "output": "Blue."}
                                                 for i in range(8)])
    assert init_and_read(alpaca, tmp_path / "b.toml")[0]["data"]["shape"] == "alpaca"


def test_preference_pairs_and_kto(tmp_path):
    pairs = [{"prompt": f"What is {i // 2} plus 2?", "chosen": f"{i // 2 + 2}", "rejected": f"{i // 2 + 3}"}
             for i in range(12)]
    recipe, said = init_and_read(write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "p.toml")
    assert recipe["task"]["name"] == "preference-tuning" and recipe["task"]["objective"] == "dpo"
    assert recipe["data"]["group_column"] == "prompt"  # repeated prompts stay on one side
    assert any("also possible: --task reward-model" in s for s in said)
    recipe, _ = init_and_read(tmp_path / "p.jsonl", tmp_path / "rm.toml", task="reward-model")
    assert recipe["task"]["name"] == "reward-model" and recipe["data"]["group_column"] == "prompt"
    kto = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2 == 0} for i in range(8)]
    recipe, _ = init_and_read(write_jsonl(tmp_path / "k.jsonl", kto), tmp_path / "k.toml")
    assert recipe["task"]["name"] == "preference-tuning" and recipe["task"]["objective"] == "kto"
