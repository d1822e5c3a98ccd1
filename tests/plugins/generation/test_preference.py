"""preference-tuning: each loss against hand arithmetic from its paper's formula, the reference model (adapter
disabled) against the untouched base, the answer-only masks, a tiny end-to-end run per objective, exact resume,
and bad input through the real CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import assert_resume_equals_uninterrupted, run_cli
from generation_fixtures import write_jsonl

from finetune_generation.data import IGNORE
from finetune_generation.preference_losses import dpo_loss, kto_loss, orpo_loss, simpo_loss


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# -- losses, by hand ------------------------------------------------------------

def test_dpo_loss_by_hand_with_label_smoothing():
    pc, pr, rc, rr = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -6.0]), torch.tensor([-6.0, -8.0]), \
        torch.tensor([-6.5, -7.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    # row 0: h = 0.5 * ((-5 + 6) - (-7 + 6.5)) = 0.5 * 1.5 = 0.75; row 1: 0.5 * ((-9 + 8) - (-6 + 7)) = -1.0
    for row, h in enumerate([0.75, -1.0]):
        assert losses[row].item() == pytest.approx(-0.9 * logsig(h) - 0.1 * logsig(-h), rel=1e-6)
    assert cr.tolist() == pytest.approx([0.5, -0.5]) and rj.tolist() == pytest.approx([-0.25, 0.5])
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert plain[0].item() == pytest.approx(-logsig(0.75), rel=1e-6)


def test_simpo_loss_by_hand():
    losses, cr, rj = simpo_loss(torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -1.0]), beta=2.0, gamma=1.0)
    # row 0: 2 * -0.5 - 2 * -1.5 - 1 = 1.0; row 1: 2 * -2 - 2 * -1 - 1 = -3.0
    assert losses.tolist() == pytest.approx([-logsig(1.0), -logsig(-3.0)], rel=1e-6)
    assert cr.tolist() == pytest.approx([-1.0, -4.0]) and rj.tolist() == pytest.approx([-3.0, -2.0])


def test_orpo_loss_by_hand():
    avg_c, avg_r = torch.tensor([-0.2, -1.0]), torch.tensor([-1.2, -0.5])
    losses, cr, rj = orpo_loss(avg_c, avg_r, -avg_c, lam=0.1)
    for row, (c, r) in enumerate([(-0.2, -1.2), (-1.0, -0.5)]):
        pc, pr = math.exp(c), math.exp(r)
        log_odds_ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        assert losses[row].item() == pytest.approx(-c - 0.1 * logsig(log_odds_ratio), rel=1e-5)
    assert cr.tolist() == pytest.approx([-0.02, -0.1])


def test_kto_loss_by_hand_with_weights_and_a_clamped_reference_point():
    policy, ref = torch.tensor([-4.0, -6.0, -3.0]), torch.tensor([-5.0, -5.0, -3.5])
    desirable = torch.tensor([True, False, False])
    losses, rewards, point = kto_loss(policy, ref, desirable, torch.tensor(0.2), beta=0.5, desirable_weight=2.0,
                                      undesirable_weight=0.5)
    # r = [1, -1, 0.5], z0 = 0.2
    expected = [2.0 * (1 - sig(0.5 * (1 - 0.2))), 0.5 * (1 - sig(0.5 * (0.2 + 1))), 0.5 * (1 - sig(0.5 * (0.2 - 0.5)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.25]) and point.item() == pytest.approx(0.1)
    _, _, clamped = kto_loss(policy, ref, desirable, torch.tensor(-3.0), beta=0.5)
    assert clamped.item() == 0.0  # a negative KL estimate is clamped at 0


# -- reference model and masks ---------------------------------------------------

def _pairs(n, seed=0, chat=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"add {a} and {b}"
        rows.append({"prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                     "chosen": f"{a}+{b}={a + b}", "rejected": f"{a}+{b}={a + b + 1}"})
    return rows


def _kto(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "completion": f"{a}+{b}={a + b + i % 2}", "label": i % 2 == 0})
    return rows


@pytest.fixture
def pref_recipe(tmp_path, tiny_llama):
    def make(objective="dpo", rows=None, task="", data="", train="", output=None, name="recipe.toml"):
        import tomllib

        import tomli_w

        rows = rows if rows is not None else (_kto(24) if objective == "kto" else _pairs(24))
        path = write_jsonl(tmp_path / f"{objective}.jsonl", rows)
        recipe = {
            "task": {"name": "preference-tuning", "objective": objective, "sample_prompts": 2,
                     "sample_max_new_tokens": 8, "max_new_tokens": 8},
            "model": {"backbone": str(tiny_llama)},
            "data": {"train": str(path), "split": 0.25, "max_length": 64},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-2, "mixed_precision": "no",
                      "log_every_steps": 1, "checkpoint_every_steps": 0, "seed": 0},
            "output": {"dir": output or str(tmp_path / f"run-{objective}")},
        }
        for section, extra in (("task", task), ("data", data), ("train", train)):
            recipe[section].update(tomllib.loads(extra))
        out = tmp_path / name
        out.write_text(tomli_w.dumps(recipe))
        return out

    return make


def _session(recipe):
    from finetune.run.session import build_model, open_session

    session = open_session(recipe)
    model, tok, _ = build_model(session)
    return session, model, tok


def test_reference_equals_the_untouched_base_even_after_training_changed_the_adapter(pref_recipe, tiny_llama):
    from transformers import AutoModelForCausalLM

    from finetune_generation.logprobs import reference, sequence_logps
    from finetune_generation.preference import answer_logps

    system = "the quick answer assistant: add the numbers and answer the sum, the quick answer"
    session, model, tok = _session(pref_recipe(task=f"system_prompt = {system!r}"))  # a prefix every row shares
    task = session.task
    ds = task.build_dataset(session.splits.train, tok, training=True)
    batch = task.collate_fn(tok)([ds[i] for i in range(4)])
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.SGD(lora, lr=0.5)
    model.train()
    for _ in range(3):  # training changes the adapter: the policy moves away from the base
        loss = task.training_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        expected, _ = sequence_logps(base, batch)
        policy, _ = answer_logps(model.eval(), batch)
    with reference(model) as ref:
        got, _ = answer_logps(ref, batch)
    assert not torch.allclose(policy, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the cached reference (computed in the first training step, before any update) is the base's too
    torch.testing.assert_close(task._reference(model, batch), expected, atol=1e-5, rtol=1e-5)
    # answer_logps (head on learned positions only, the shared prefix computed once) = sequence_logps (full logits)
    from finetune_generation.causal_lm import shared_prefix_length

    assert shared_prefix_length(model, batch) > 0  # the system prompt is shared: that path is tested
    with torch.no_grad():
        got, counts = answer_logps(model, batch)
        want, want_counts = sequence_logps(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == want_counts.tolist()
    import finetune_generation.preference as preference

    original = preference.shared_prefix_length
    preference.shared_prefix_length = lambda *a: 0
    try:
        with torch.no_grad():
            torch.testing.assert_close(answer_logps(model, batch)[0], want, atol=1e-5, rtol=1e-5)
    finally:
        preference.shared_prefix_length = original


class _Wrapped(torch.nn.Module):
    """What DDP looks like to a task: the PEFT model as ``.module``, without ``get_base_model``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_a_fresh_adapter_has_rewards_of_exactly_zero_wrapped_or_not(pref_recipe, objective, wrapped):
    """The reference pass computes as its policy does (the same path: under a wrapper both take the standard
    one), so with the adapter still at zero every implicit reward is 0.0, not rounding noise (two processes
    once reported a reward accuracy of 0.375 before training)."""
    system = "the quick answer assistant: add the numbers and answer the sum, the quick answer"
    session, model, tok = _session(pref_recipe(objective, task=f"system_prompt = {system!r}"))
    task = session.task
    ds = task.build_dataset(session.splits.train, tok, training=True)
    batch = task.collate_fn(tok)([ds[i] for i in range(4)])
    policy = _Wrapped(model) if wrapped else model
    with torch.no_grad():
        _, predictions, _ = task._losses(policy.eval(), batch)
        if objective == "kto":  # the KL estimate's own policy and reference passes
            assert task._kl_estimate(policy, batch).item() == 0.0
    rewards = predictions[:, :1] if objective == "kto" else predictions[:, :2]
    assert rewards.abs().max().item() == 0.0


@pytest.mark.parametrize("chat", [False, True])
def test_the_batch_learns_only_answer_tokens_and_their_end_token(pref_recipe, tmp_path, chat):
    session, _, tok = _session(pref_recipe(rows=_pairs(8, chat=chat)))
    ds = session.task.build_dataset(session.splits.train, tok, training=True)
    batch = session.task.collate_fn(tok)([ds[0], ds[1]])
    ex = session.splits.train
    for row in range(4):
        labels = batch["labels"][row]
        learned = tok.decode(labels[labels != IGNORE])
        pair = ex[row % 2]
        answer = pair.chosen if row < 2 else pair.rejected
        assert learned == answer + "<|im_end|>"
        text = tok.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        question = pair.record["prompt"][0]["content"] if chat else pair.record["prompt"]
        assert text == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


# -- end to end ------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_end_to_end_run_reports_reward_metrics_before_and_after(pref_recipe, objective):
    recipe = pref_recipe(objective)
    result = run_cli("run", str(recipe), "-q")
    assert result.returncode == 0, result.stderr
    run = recipe.parent / f"run-{objective}"
    metrics = json.loads((run / "metrics.json").read_text())
    names = ["reward_accuracy", "eval_loss"] + (["desirable_rewards", "undesirable_rewards", "kl"]
                                                if objective == "kto" else
                                                ["reward_margin", "chosen_logps", "rejected_logps"])
    for name in names:
        assert isinstance(metrics["before"][name], float), (name, metrics["before"])
        assert isinstance(metrics["best"][name], float), (name, metrics["best"])
    if objective == "dpo":  # the policy starts as the reference: rewards 0, loss log 2
        assert metrics["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
        assert metrics["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert metrics["best"]["reward_margin"] > 0  # chosen (right sums) preferred after training
    assert (run / "samples" / "step-00000000.jsonl").exists()
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_resume_equals_uninterrupted(pref_recipe, tmp_path, callback_plugin):
    full = pref_recipe("dpo", train="epochs = 2", output=str(tmp_path / "full"), name="full.toml")
    cut = pref_recipe("dpo", train="epochs = 2", output=str(tmp_path / "cut"), name="cut.toml")
    assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=5)


# -- bad input through the CLI -----------------------------------------------------

@pytest.mark.parametrize(("objective", "bad", "fragments"), [
    ("dpo", {"prompt": "add 1 and 1", "chosen": "1+1=2", "rejected": "1+1=2"}, ["identical", "nothing to prefer"]),
    ("kto", {"prompt": "add 1 and 1", "completion": "", "label": True}, ["'completion' (data.completion_column) is "
                                                                         "empty"]),
    ("dpo", {"prompt": "add 1 and 1", "chosen": "1+1=2", "rejectd": "1+1=3"}, ["did you mean 'rejectd'?"]),
    ("kto", {"prompt": "add 1 and 1", "completion": "1+1=2", "label": "good"}, ["'good'", "desirable"]),
], ids=["identical", "empty-completion", "missing-column", "kto-bad-label"])
def test_bad_input_is_a_clear_error_before_the_run_folder(pref_recipe, tmp_path, objective, bad, fragments):
    rows = (_kto(6) if objective == "kto" else _pairs(6))
    rows.insert(3, bad)
    recipe = pref_recipe(objective, rows=rows)
    result = run_cli("run", str(recipe), "-q")
    assert result.returncode == 2, result.stderr
    assert f"{objective}.jsonl: line 4" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not (tmp_path / f"run-{objective}").exists()


def test_sft_weight_adds_the_chosen_mean_token_nll_and_other_objectives_refuse_it(pref_recipe):
    from finetune.errors import RecipeError
    from finetune.run.session import open_session
    from finetune_generation.logprobs import sequence_logps

    session, model, tok = _session(pref_recipe(task="sft_weight = 0.5"))
    task = session.task
    ds = task.build_dataset(session.splits.train, tok, training=True)
    batch = task.collate_fn(tok)([ds[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        with_sft = task._losses(model, batch)[0]
        task.recipe.task.sft_weight = 0.0
        plain = task._losses(model, batch)[0]
        sums, counts = sequence_logps(model, batch)
    torch.testing.assert_close(with_sft - plain, 0.5 * -(sums[:3] / counts[:3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(RecipeError, match="task.sft_weight applies to objective 'dpo' only"):
        open_session(pref_recipe("orpo", task="sft_weight = 0.5"))


def test_kto_kl_rows_pair_each_prompt_with_the_next_rows_answer():
    from finetune_generation.preference import mismatched_batch
    from finetune_generation.preference_data import collate_preferences

    items = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4], "desirable": True, "index": 0},
             {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "desirable": False, "index": 1},
             {"input_ids": [8, 9], "labels": [IGNORE, 9], "desirable": True, "index": 2}]
    kl = mismatched_batch(collate_preferences(items, pad_id=0), pad_id=0, max_length=4)
    # prompt 0 + answer 1, prompt 1 + answer 2, prompt 2 + answer 0; cut at max_length 4
    assert kl["input_ids"].tolist() == [[1, 2, 6, 7], [5, 9, 0, 0], [8, 3, 4, 0]]
    assert kl["labels"].tolist() == [[IGNORE, IGNORE, 6, 7], [IGNORE, 9, IGNORE, IGNORE], [IGNORE, 3, 4, IGNORE]]
    assert kl["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
