"""The text plugin's frozen-prefix cache (finetune_nlp.prefix_cache): the same outputs and gradients,
dropout off only below, refused when it cannot be exact; end to end and reported."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from finetune.engine.console import Console
from finetune.errors import RecipeError
from finetune.run.training import run_recipe

QUIET = Console(enabled=False)


def _cache_model(tiny_bert, first: int = 1):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             layers_to_transform=[first], layers_pattern="layer",
                                             modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS",
                                             init_lora_weights=False))  # non-zero B: LoRA changes outputs
    return model


def _batch(tiny_bert, texts, ids):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([i % 2 for i in range(len(texts))])
    batch["example_id"] = torch.tensor(ids)
    return batch


def test_prefix_cache_gives_the_same_outputs_and_gradients(tiny_bert):
    """Cached forward/backward == a plain forward/backward with the frozen layers in eval mode."""
    import torch

    from finetune_nlp.prefix_cache import FrozenPrefixCache

    texts = ["good great film", "bad", "fine plot actor movie awful", "terrible boring"]
    model = _cache_model(tiny_bert)
    cache = FrozenPrefixCache(model, 1)
    model.eval()  # no dropout anywhere: both paths must agree exactly (up to float rounding)
    batch = _batch(tiny_bert, texts, [0, 1, 2, 3])
    plain = dict(batch)
    plain.pop("example_id")

    def grads(out):
        out.loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.logits.detach(), g

    ref_logits, ref_grads = grads(model(**plain))
    first_logits, first_grads = grads(cache.forward(model, batch))  # fills the cache
    assert len(cache) == 4
    # a second pass reads the cache, with examples in another order and another padding width
    reordered = _batch(tiny_bert, [texts[2], texts[0]], [2, 0])
    again = cache.forward(model, reordered).logits.detach()
    for logits, g in ((first_logits, first_grads),):
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        assert g.keys() == ref_grads.keys() and g
        for name in g:
            assert torch.allclose(g[name], ref_grads[name], atol=1e-5), name
    assert torch.allclose(again, ref_logits[[2, 0]], atol=1e-5)
    # the model is restored after every cached pass: a plain forward still runs every layer
    assert torch.allclose(model(**plain).logits, ref_logits, atol=1e-6)


def test_prefix_cache_train_mode_turns_off_dropout_only_below(tiny_bert):
    from finetune_nlp.prefix_cache import FrozenPrefixCache

    model = _cache_model(tiny_bert)
    cache = FrozenPrefixCache(model, 1)
    cache.train_mode(model)
    base = model.get_base_model()
    assert not base.bert.embeddings.training and not base.bert.encoder.layer[0].training
    assert base.bert.encoder.layer[1].training and base.classifier.training


def test_prefix_cache_refuses_a_trainable_prefix(tiny_bert):
    from finetune_nlp.prefix_cache import FrozenPrefixCache

    model = _cache_model(tiny_bert, first=0)
    with pytest.raises(RecipeError, match="needs LoRA above layer 0"):
        FrozenPrefixCache(model, 0)
    model = _cache_model(tiny_bert)
    model.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(RecipeError, match="frozen"):
        FrozenPrefixCache(model, 1)


CACHE_RECIPE = ["task.cache_frozen_layers=true", "peft.layers=[-1]"]


def test_cached_run_end_to_end_and_reported(make_recipe, tmp_path):
    recipe = make_recipe(train="epochs = 3")
    from finetune.run.dry_run import dry_run

    info = dry_run(recipe, CACHE_RECIPE, QUIET)
    assert any("task.cache_frozen_layers" in n and "no dropout" in n for n in info["speed_settings"])
    run = run_recipe(recipe, CACHE_RECIPE, console=QUIET)
    assert run.is_finished()
    assert any("cache_frozen_layers" in note for note in run.info()["speed_settings"])
    metrics = json.loads(run.metrics_file.read_text())
    assert metrics["best"]["accuracy"] >= 0.6  # learns (chance is 0.5)
    # The adapter loads and predicts without the cache; the eval accuracy is reproduced.
    result = run_cli("predict", str(run.path), "--text", "good great film")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overrides,fragment", [
    (["task.cache_frozen_layers=true"], "needs LoRA in the top layers only"),
    (["task.cache_frozen_layers=true", "peft.layers=[0, 1]"], "includes layer 0"),
    (["task.cache_frozen_layers=true", "peft.layers=[1]", 'peft.method="none"'], "peft.layers"),
])
def test_bad_cache_settings_are_refused_before_the_run_folder(make_recipe, tmp_path, overrides, fragment):
    with pytest.raises(RecipeError) as err:
        run_recipe(make_recipe(), overrides, console=QUIET)
    assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()
