"""finetune_nlp.bert_layers: the last encoder layer for the first token only (task.last_layer_cls_only)
and attention dropout with numpy masks on CPU (train.fast_dropout)."""

from __future__ import annotations

import pytest

from finetune.engine.console import Console

QUIET = Console(enabled=False)

TEXTS = ["good great film", "bad", "fine plot actor movie awful", "terrible boring"]


def _model(tiny_bert, attention="sdpa", dtype=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2,
                                                               attn_implementation=attention)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS",
                                             init_lora_weights=False))  # non-zero B: LoRA changes outputs
    return model.to(dtype) if dtype is not None else model


def _batch(tiny_bert, texts=TEXTS):
    import torch
    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(str(tiny_bert))(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([i % 2 for i in range(len(texts))])
    return batch


def _loss_and_grads(model, batch):
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shortened_last_layer_gives_the_same_logits_loss_and_gradients(tiny_bert, attention):
    """float64, no dropout: everything the model computes for the head is equal to rounding."""
    import torch

    from finetune_nlp.bert_layers import is_shortened, last_layer, shorten_last_layer

    model = _model(tiny_bert, attention, torch.float64)
    batch = _batch(tiny_bert)  # padded: 3, 1, 5 and 2 words
    assert batch["attention_mask"].float().mean() < 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert last_layer(model) is model.get_base_model().bert.encoder.layer[-1]
    shortened, why = shorten_last_layer(model, lambda: model(**batch).logits)
    assert shortened and why == "" and is_shortened(model)
    calls = []
    handle = last_layer(model).attention.output.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    logits, loss, grads = _loss_and_grads(model, batch)
    handle.remove()
    assert calls == [torch.Size([4, 1, 32])]  # the last layer's attention output: the first token only
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-12)
    assert abs(float(loss - ref_loss)) < 1e-12
    assert grads.keys() == ref_grads.keys() and any("layer.1.attention.self.query" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=0, atol=1e-12), name
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # a merged adapter: the layer looks its projections up on every call
    merged = model.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, ref_logits, rtol=0, atol=1e-12)


def test_training_mode_runs_dropout_and_trains_the_last_layer(tiny_bert):
    import torch

    from finetune_nlp.bert_layers import shorten_last_layer

    model = _model(tiny_bert)
    batch = _batch(tiny_bert)
    assert shorten_last_layer(model, lambda: model(**batch).logits)[0]
    model.train()
    torch.manual_seed(1)
    first, _, grads = _loss_and_grads(model, batch)
    torch.manual_seed(2)
    second = model(**batch).logits.detach()
    assert torch.isfinite(first).all() and not torch.equal(first, second)  # dropout is on
    for name in ("layer.1.attention.self.query.lora_A", "layer.1.attention.self.value.lora_B",
                 "layer.0.attention.self.query.lora_A"):
        grad = next(g for n, g in grads.items() if name in n)
        assert grad.abs().sum() > 0, name
    assert model.training and all(m.training for m in model.modules())  # the check restored the modes


def test_a_head_that_reads_other_tokens_keeps_the_full_layer(tiny_bert):
    import torch

    from finetune_nlp.bert_layers import is_shortened, shorten_last_layer

    model = _model(tiny_bert)
    pooler = model.get_base_model().bert.pooler
    pooler.forward = lambda hidden: torch.tanh(pooler.dense(hidden.mean(dim=1)))  # mean pooling
    batch = _batch(tiny_bert)
    model.eval()
    before = model(**batch).logits.detach()
    shortened, why = shorten_last_layer(model, lambda: model(**batch).logits)
    assert not shortened and "reads more than the first token" in why and not is_shortened(model)
    assert torch.equal(model(**batch).logits.detach(), before)


def test_other_layouts_are_left_alone():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from finetune_nlp.bert_layers import last_layer, shorten_last_layer

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2,
                                                                 hidden_dim=64, max_position_embeddings=16))
    assert last_layer(model) is None
    assert shorten_last_layer(model, lambda: None) == (False, "the last layer is not laid out like BERT's")


def test_on_by_default_reported_and_off_with_the_option(make_recipe, tmp_path):
    from finetune.run.dry_run import dry_run
    from finetune.run.session import build_model, open_session
    from finetune.run.training import run_recipe
    from finetune_nlp.bert_layers import is_shortened

    model, _, _ = build_model(open_session(make_recipe()))
    assert is_shortened(model)
    info = dry_run(make_recipe(), [], QUIET)
    assert any(n.startswith("task.last_layer_cls_only:") for n in info["speed_settings"])
    off = ["task.last_layer_cls_only=false"]
    model, _, _ = build_model(open_session(make_recipe(), off))
    assert not is_shortened(model)
    assert not any("last_layer_cls_only" in n for n in dry_run(make_recipe(), off, QUIET)["speed_settings"])
    run = run_recipe(make_recipe(train="epochs = 1", output=str(tmp_path / "run")), [], console=QUIET)
    assert any(n.startswith("task.last_layer_cls_only:") for n in run.info()["speed_settings"])


# -- attention that applies the layer's own dropout module (train.fast_dropout) ---------------------

def _fast(model):
    from finetune.engine.fast_dropout import install_fast_dropout

    return install_fast_dropout(model)


def test_explicit_attention_is_softmax_attention_with_the_layers_dropout_module(tiny_bert):
    import torch
    import torch.nn.functional as F

    from finetune.engine.fast_dropout import numpy_dropout
    from finetune_nlp.bert_layers import _attention, explicit_attention

    model = _model(tiny_bert)
    assert explicit_attention(model) == 2
    sa = model.get_base_model().bert.encoder.layer[0].attention.self
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]  # key padding
    sa.train()
    torch.manual_seed(3)  # PyTorch's own dropout module: SDPA with its fused dropout, as before
    plain = _attention(sa, q, k, v, keep)
    torch.manual_seed(3)
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sa.scaling,
                                                             dropout_p=sa.dropout.p))
    assert _fast(model) > 0  # train.fast_dropout replaces the module: attention applies it
    sa.train()
    torch.manual_seed(3)
    out = _attention(sa, q, k, v, keep)
    torch.manual_seed(3)
    scores = (q @ k.transpose(-1, -2)) * sa.scaling + torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    expected = numpy_dropout(scores.softmax(-1), sa.dropout.p) @ v
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sa.scaling))
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    sa.eval()  # evaluation: PyTorch's attention, no dropout
    assert torch.equal(_attention(sa, q, k, v, keep),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sa.scaling))


def test_explicit_attention_with_numpy_dropout_is_unbiased_like_torchs():
    """Averaged over many draws, attention with dropout is attention without it, as for PyTorch's."""
    import types

    import torch
    import torch.nn.functional as F

    from finetune.engine.fast_dropout import fast_dropout_module
    from finetune_nlp.bert_layers import _attention

    sa = types.SimpleNamespace(dropout=fast_dropout_module(0.1).train(), training=True, scaling=0.25)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)
    draws = 2000
    ours = sum(_attention(sa, q, k, v, keep) for _ in range(draws)) / draws
    torchs = sum(F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25, dropout_p=0.1)
                 for _ in range(draws)) / draws
    ours_err, torchs_err = float((ours - exact).abs().max()), float((torchs - exact).abs().max())
    assert ours_err < 0.06 and torchs_err < 0.06, (ours_err, torchs_err)  # a dropped 1/(1-p) would be ~0.2


def test_explicit_attention_layers_train_and_evaluate_like_the_originals(tiny_bert):
    import torch

    from finetune_nlp.bert_layers import explicit_attention

    model = _model(tiny_bert)
    batch = _batch(tiny_bert)
    model.eval()
    reference = model(**batch).logits.detach()
    assert explicit_attention(model) == 2
    _fast(model)
    assert torch.equal(model(**batch).logits.detach(), reference)  # evaluation is unchanged
    model.train()
    torch.manual_seed(1)
    logits, loss, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss) and not torch.allclose(logits, reference)  # dropout on
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)
    for module in model.modules():  # no dropout: PyTorch's attention, the same logits as in evaluation
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert torch.allclose(model(**batch).logits, reference, atol=1e-6)


def test_attention_applies_fast_dropout_and_one_note_reports_it(make_recipe):
    import torch

    from finetune.run.dry_run import dry_run
    from finetune.run.session import build_model, open_session

    model, _, report = build_model(open_session(make_recipe()))
    attentions = [layer.attention.self for layer in model.get_base_model().bert.encoder.layer]
    assert all("forward" in sa.__dict__ and type(sa.dropout) is not torch.nn.Dropout for sa in attentions)
    notes = dry_run(make_recipe(), [], QUIET)["speed_settings"]
    assert [n for n in notes if n.startswith("train.fast_dropout:")] == [
        "train.fast_dropout: dropout on CPU picks the values it drops with a faster random generator "
        f"({report.fast_dropout_modules} dropout layers): faster training steps; the same share of values is dropped "
        "but not the same ones, so results differ slightly from PyTorch's dropout (set it to false for PyTorch's)"]
    off = ["train.fast_dropout=false"]
    model, _, _ = build_model(open_session(make_recipe(), off))
    layers = model.get_base_model().bert.encoder.layer
    assert all(type(layer.attention.self.dropout) is torch.nn.Dropout for layer in layers)
    assert not any("fast_dropout" in n for n in dry_run(make_recipe(), off, QUIET)["speed_settings"])
