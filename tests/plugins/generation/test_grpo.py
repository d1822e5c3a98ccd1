"""The ``grpo`` task: group advantages, the clipped surrogate + KL loss, completion log-probabilities with the
prompt computed once per group, and runs through the real CLI (third-party reward, bad input, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from generation_fixtures import make_qa_rows, write_jsonl

from finetune_generation.grpo_losses import group_advantages, grpo_loss


def test_advantages_sum_to_zero_within_each_group_and_equal_hand_computed_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, scale=True, eps=0.0)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    std = math.sqrt((4 * 0.5 ** 2) / 3)  # sample std of [1, 0, 0, 1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))  # all equal: nothing to learn
    centred = group_advantages(rewards, 4, scale=False)
    assert torch.allclose(centred[8:], torch.tensor([-1.0, 2.0, -1.0, 0.0]))
    assert torch.allclose(group_advantages(rewards, 4)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))


def test_the_loss_equals_a_hand_computed_value_with_the_clip_binding_and_the_kl_term():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -0.1], [-0.2, -2.0, -9.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-0.4, -3.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    clip, beta = 0.2, 0.1
    loss, kl = grpo_loss(logps, old, ref, mask, adv, clip, beta)

    def token(lp, o, r, a):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
        d = r - lp
        return -surrogate + beta * (math.exp(d) - d - 1), math.exp(d) - d - 1

    rows, kls = [], []
    for i in range(2):
        parts = [token(logps[i, j].item(), old[i, j].item(), ref[i, j].item(), adv[i].item())
                 for j in range(3) if mask[i, j]]
        rows.append(sum(p[0] for p in parts) / len(parts))
        kls.append(sum(p[1] for p in parts) / len(parts))
    assert loss.item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert kl.item() == pytest.approx(sum(kls) / 2, rel=1e-6)
    # the clip binds: token (0, 0) has ratio e^0.5 > 1.2 with a positive advantage -> no gradient from the
    # surrogate there, only the KL term's
    loss.backward()
    d = ref[0, 0] - logps[0, 0].detach()
    assert logps.grad[0, 0].item() == pytest.approx(beta * (1 - math.exp(d)) / 2 / 2, rel=1e-5)
    # with old == new (one update per group) the ratio is 1 and the gradient is the plain policy gradient
    fresh = logps.detach().clone().requires_grad_(True)
    grpo_loss(fresh, fresh.detach(), fresh.detach(), mask, adv, clip, 0.0)[0].backward()
    assert fresh.grad[0, 0].item() == pytest.approx(-2.0 / 2 / 2)


def _peft(folder, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets)), tokenizer


def _inputs(group=3):
    torch.manual_seed(1)
    prompt = torch.randint(5, 200, (2, 7))
    pmask = torch.ones_like(prompt)
    pmask[1, :3] = 0  # left padding
    new = torch.randint(5, 200, (2 * group, 5))
    keep = torch.ones_like(new, dtype=torch.bool)
    keep[0, 3:] = False  # stopped early
    return {"prompt_ids": prompt, "prompt_mask": pmask, "completion_ids": new, "completion_mask": keep,
            "group": group}


@pytest.mark.parametrize("fixture,targets", [("tiny_llama", ["q_proj", "v_proj"]), ("tiny_gpt2", ["c_attn"])])
def test_the_prompt_computed_once_per_group_gives_the_log_probs_of_full_rows(request, fixture, targets):
    from finetune_generation.grpo import completion_logps

    model, _ = _peft(request.getfixturevalue(fixture), targets)
    with torch.no_grad():
        for p in model.parameters():  # a non-zero adapter
            p.add_(0.01 * torch.randn_like(p))
    inputs = _inputs()
    shared = completion_logps(model, inputs)
    plain = completion_logps(model, {**inputs, "share_prompt": False})
    keep = inputs["completion_mask"]
    assert shared.shape == (6, 5)
    assert torch.allclose(shared[keep], plain[keep], atol=1e-5)
    # one row by itself, without padding or batching, gives the same numbers
    row = 4  # prompt 1 (left-padded), completion 1 of its group
    ids = torch.cat([inputs["prompt_ids"][1, 3:], inputs["completion_ids"][row]])[None]
    logits = model(input_ids=ids).logits[0, 3:-1].float()
    alone = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][row][:, None])[:, 0]
    assert torch.allclose(shared[row], alone, atol=1e-5)
    # gradients flow to the adapter through the shared prompt
    shared[keep].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("fixture,targets", [("tiny_llama", ["q_proj", "v_proj"]), ("tiny_gpt2", ["c_attn"])])
def test_sampling_groups_from_prompts_computed_once_gives_the_tokens_of_plain_generation(request, fixture, targets):
    from finetune_generation.grpo import sample_groups

    model, tok = _peft(request.getfixturevalue(fixture), targets)
    with torch.no_grad():
        for p in model.parameters():  # a non-zero adapter
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    inputs = _inputs()
    prompt, pmask = inputs["prompt_ids"], inputs["prompt_mask"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": [tok.eos_token_id or 0], "pad_token_id": 0,
              "use_cache": True}
    shared = sample_groups(model, prompt, pmask, 3, kwargs)
    plain = sample_groups(model, prompt, pmask, 3, kwargs, share_prompt=False)
    assert shared.shape == (6, 7 + 6) and torch.equal(shared[:, :7], prompt.repeat_interleave(3, 0))
    assert torch.equal(shared, plain)
    # sampled: the same random draws from the same probabilities give the same tokens
    kwargs.update(do_sample=True, temperature=1.0, top_k=None, top_p=None)
    torch.manual_seed(5)
    shared = sample_groups(model, prompt, pmask, 3, kwargs)
    torch.manual_seed(5)
    assert torch.equal(shared, sample_groups(model, prompt, pmask, 3, kwargs, share_prompt=False))


def test_skipping_the_groups_without_signal_gives_the_same_loss_and_gradient(tiny_llama):
    from finetune_generation.grpo import completion_logps, groups_with_signal

    model, _ = _peft(tiny_llama, ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = _inputs()  # 2 prompts x 3 answers
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.1, 0.1])  # the first group all equal: no signal
    adv = group_advantages(rewards, 3)

    def loss_and_grads(inputs, adv, share):
        model.zero_grad()
        logps = completion_logps(model, inputs)
        loss = grpo_loss(logps, logps.detach(), logps.detach(), inputs["completion_mask"], adv, 0.2, 0.0)[0] * share
        loss.backward()
        return loss.detach(), [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    full, full_grads = loss_and_grads(inputs, adv, 1.0)
    prompts, rows, share = groups_with_signal(rewards, 3)
    assert prompts.tolist() == [1] and rows.tolist() == [3, 4, 5] and share == 0.5
    sub = {**inputs, "prompt_ids": inputs["prompt_ids"][prompts], "prompt_mask": inputs["prompt_mask"][prompts],
           "completion_ids": inputs["completion_ids"][rows], "completion_mask": inputs["completion_mask"][rows]}
    skipped, skipped_grads = loss_and_grads(sub, adv[rows], share)
    assert skipped.item() == pytest.approx(full.item(), abs=1e-7)  # (0 in value: advantages sum to 0)
    assert any(g.abs().sum() > 0 for g in full_grads)
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-4) for a, b in zip(full_grads, skipped_grads))
    # no group with signal: one group is kept (zero loss, a graph to call backward on)
    prompts, rows, share = groups_with_signal(torch.ones(6), 3)
    assert prompts.tolist() == [0] and rows.tolist() == [0, 1, 2] and share == 0.5


def test_the_kl_term_is_exactly_zero_with_a_fresh_adapter(tiny_llama):
    from finetune_generation.grpo import completion_logps
    from finetune_generation.logprobs import reference

    model, _ = _peft(tiny_llama, ["q_proj", "v_proj"])  # lora_B = 0: policy == reference
    model.train()
    inputs = _inputs()
    logps = completion_logps(model, inputs)
    with reference(model) as ref_model:
        ref = completion_logps(ref_model, inputs)
    loss, kl = grpo_loss(logps, logps.detach(), ref, inputs["completion_mask"], torch.tensor([1.0, -1, 0, 0, 1, -1]),
                         0.2, 0.04)
    assert kl.item() == 0.0
    assert model.training  # the reference pass put the model back


# -- runs through the real CLI -------------------------------------------------------------------------------

GRPO_TASK = 'name = "grpo"\ngroup_size = 3\nmax_new_tokens = 6\ntemperature = 1.0\nkl_weight = 0.04\n'


def _env(tmp_path):
    import os

    from fake_plugins import reward_plugin_site

    site = tmp_path / "site"
    if not site.exists():
        reward_plugin_site(tmp_path)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _recipe(make_gen_recipe, tmp_path, rewards: str, *, rows: int = 24, name: str = "recipe.toml", out: str = "run",
            train: str = "epochs = 1\nbatch_size = 4\nlog_every_steps = 1\neval_every_steps = 3"):
    data = write_jsonl(tmp_path / "data" / "grpo.jsonl", make_qa_rows(rows, seed=3))
    return make_gen_recipe(task=GRPO_TASK + f"rewards = {rewards}\n", data=f'train = "{data}"', train=train,
                           name=name, output=str(tmp_path / out))


def test_a_tiny_grpo_run_with_a_third_party_reward_reports_rewards_before_and_after(make_gen_recipe, tmp_path):
    from conftest import run_cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(make_gen_recipe, tmp_path, '{ starts-with-digit = 1.0, exact-number = 0.5, length-penalty = 0.1 }')
    listed = run_cli("rewards", env=_env(tmp_path))
    assert listed.returncode == 0 and "starts-with-digit" in listed.stdout and "exact-number" in listed.stdout
    result = run_cli("run", str(recipe), "-q", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("before", "best", "last"):
        assert {"reward", "reward_starts-with-digit", "reward_exact-number", "reward_length-penalty",
                "completion_length"} <= set(metrics[part]), metrics[part]
    before = metrics["before"]
    assert before["reward"] == pytest.approx(before["reward_starts-with-digit"] + 0.5 * before["reward_exact-number"]
                                             + 0.1 * before["reward_length-penalty"])
    assert metrics["data"]["rewards"] == {"starts-with-digit": 1.0, "exact-number": 0.5, "length-penalty": 0.1}
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 5  # 18 prompts / 4 per step, logged at every step
    for row in train:  # Task.training_logs: the per-step numbers of the sampled groups
        assert {"reward", "reward_std", "kl", "completion_length", "reward_starts-with-digit", "reward_exact-number",
                "reward_length-penalty"} <= set(row), row
        assert row["kl"] >= 0 and row["reward_std"] >= 0 and 1 <= row["completion_length"] <= 6
    assert train[0]["kl"] == 0.0  # the first step samples from a fresh adapter: policy == reference
    steps = sorted(p.name for p in (run / "samples").glob("step-*.jsonl"))
    assert steps[0] == "step-00000000.jsonl" and len(steps) >= 2
    rows = [json.loads(line) for line in (run / "samples" / steps[-1]).read_text().splitlines()]
    assert len(rows) == 6  # every eval prompt (0.25 of 24)
    for row in rows:
        assert set(row["rewards"]) == {"starts-with-digit", "exact-number", "length-penalty"}
        assert row["reward"] == pytest.approx(row["rewards"]["starts-with-digit"] + 0.5 * row["rewards"]["exact-number"]
                                              + 0.1 * row["rewards"]["length-penalty"])
        assert row["prompt"].startswith("add ") and "=" in row["reference"]
    assert metrics["best"]["reward"] >= before["reward"] or metrics["best"]["step"] == 0
    # `finetune evaluate` scores a finished run on any file with the run's rewards
    evaluated = run_cli("evaluate", str(run), "--input", str(tmp_path / "data" / "grpo.jsonl"), env=_env(tmp_path))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "reward_starts-with-digit" in evaluated.stdout + evaluated.stderr
    # the adapter loads with plain peft
    base = AutoModelForCausalLM.from_pretrained(_backbone(recipe))
    PeftModel.from_pretrained(base, str(run / "adapter"))


def _backbone(recipe):
    import tomllib

    return tomllib.loads(recipe.read_text())["model"]["backbone"]


@pytest.mark.parametrize(("rewards", "data", "message"), [
    ("{ exact-numbr = 1.0 }", None,
     r"task.rewards: no reward function 'exact-numbr' \(did you mean 'exact-number'\?\)"),
    ("{ always-raises = 1.0 }", None, r"reward function 'always-raises' \(plugin '[^']*rewards[^']*'\) raised "
                                     r"RuntimeError: the scoring service is offline"),
    ("{ returns-nan = 1.0 }", None, r"reward function 'returns-nan' \(plugin '[^']*rewards[^']*'\) returned nan"),
    ("{ exact-number = 1.0 }", [{"prompt": "add 1 and 2", "completion": "1+2=3"}, {"prompt": " ", "completion": "x"}],
     r"data.train: .*grpo.jsonl: line 2: field 'prompt' \(data.prompt_column\) is empty"),
    ("{ exact-number = 1.0 }", [{"prompt": "add 1 and 2"}, {"prompt": "add 2 and 2"}],
     r"task.rewards: 'exact-number' compares completions with the reference answer, and .*grpo.jsonl: line \d "
     r"has none"),
    ("{ format = 1.0 }", [], r"data.train: .*grpo.jsonl has no records"),
])
def test_bad_input_stops_before_the_run_folder_exists(make_gen_recipe, tmp_path, rewards, data, message):
    import re

    from conftest import run_cli

    recipe = _recipe(make_gen_recipe, tmp_path, rewards)
    if data is not None:
        write_jsonl(tmp_path / "data" / "grpo.jsonl", data)
    result = run_cli("run", str(recipe), env=_env(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_prompt_only_rows_train_with_rewards_that_need_no_reference(make_gen_recipe, tmp_path):
    from finetune.run.session import open_session

    recipe = _recipe(make_gen_recipe, tmp_path, "{ format = 1.0 }")
    write_jsonl(tmp_path / "data" / "grpo.jsonl",
                [{"prompt": f"add {i} and 1"} for i in range(6)])
    session = open_session(recipe, [])
    rows = [e.extra["row"] for e in session.splits.train]
    assert all(r["reference"] is None and r["prompt"].startswith("add") for r in rows)
    chat = write_jsonl(tmp_path / "data" / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"add {i} and 1"}]}
        for i in range(4)] + [{"messages": [{"role": "user", "content": "add 1 and 1"},
                                            {"role": "assistant", "content": "1+1=2"}]}])
    session = open_session(recipe, [f"data.train={chat}", "data.split=0.2"])
    examples = sorted([*session.splits.train, *session.splits.eval], key=lambda e: e.where)
    assert [e.extra["row"]["reference"] for e in examples] == [None, None, None, None, "1+1=2"]
    assert examples[0].messages[0] == {"role": "system", "content": "be brief"}
    assert examples[-1].messages == [{"role": "user", "content": "add 1 and 1"}]  # the answer is the reference


def test_ctrl_c_then_resume_equals_the_uninterrupted_grpo_run(make_gen_recipe, tmp_path, callback_plugin):
    from conftest import assert_resume_equals_uninterrupted

    train = "epochs = 2\nbatch_size = 4\nlog_every_steps = 1\neval_every_steps = 2"
    full = _recipe(make_gen_recipe, tmp_path, "{ exact-number = 1.0, format = 0.5 }", rows=16, name="full.toml",
                   out="full", train=train)
    cut = _recipe(make_gen_recipe, tmp_path, "{ exact-number = 1.0, format = 0.5 }", rows=16, name="cut.toml",
                  out="cut", train=train)
    full_run, resumed = assert_resume_equals_uninterrupted(callback_plugin, full, cut, stop_at=3)
    for step in ("00000000", "00000002", "00000006"):  # the samples (greedy answers + rewards) agree too
        a, b = ((r.path / "samples" / f"step-{step}.jsonl").read_text() for r in (full_run, resumed))
        assert a == b


def test_training_needs_sampling_but_a_finished_run_may_predict_greedily(make_gen_recipe, tmp_path):
    from finetune import RecipeError
    from finetune.run.session import open_session

    recipe = _recipe(make_gen_recipe, tmp_path, "{ exact-number = 1.0 }")
    with pytest.raises(RecipeError, match=r"task.temperature: GRPO learns from sampled completions"):
        open_session(recipe, ["task.temperature=0"])
    with pytest.raises(RecipeError, match=r"task.format_regex: '\(' is not a valid regular expression"):
        open_session(recipe, ["task.format_regex=("])
