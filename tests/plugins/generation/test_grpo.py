"""The ``grpo`` task: group advantages, the clipped surrogate + KL loss, completion log-probabilities with the
prompt computed once per group, and runs through the real CLI (third-party reward, bad input, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from generation_fixtures import make_qa_rows, to_messages, write_jsonl

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
