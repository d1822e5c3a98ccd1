"""task.pooling = "mean" (finetune_nlp.mean_pooling): the text classifier reads the mean of the last layer
over the real tokens instead of the first token."""

from __future__ import annotations

import pytest

from finetune.engine.console import Console

QUIET = Console(enabled=False)
TEXTS = ["good great film", "bad", "fine plot actor movie awful", "terrible boring"]


def _models(tiny_bert):
    """The same weights twice, under PEFT (which calls the classifier's forward past its own hooks): plain,
    and with mean pooling."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finetune_nlp.mean_pooling import add_mean_pooling

    out = []
    for mean in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
        if mean:
            add_mean_pooling(model)
        out.append(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS",
                                                    init_lora_weights=False)).eval())
    return out


def test_the_head_reads_the_mean_over_real_tokens_only(tiny_bert):
    import torch
    from transformers import AutoTokenizer

    plain, mean = _models(tiny_bert)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"].float().mean() < 1  # padded
    with torch.no_grad():
        hidden = plain.get_base_model().bert(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        bert = plain.get_base_model()
        expected = bert.classifier(bert.bert.pooler.activation(bert.bert.pooler.dense(pooled)))
        got = mean(**batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, plain(**batch).logits)  # not what [CLS] gives
        alone = mean(**tokenizer(TEXTS[1:2], return_tensors="pt")).logits  # padding does not count
        torch.testing.assert_close(alone, got[1:2], rtol=1e-5, atol=1e-6)


def test_recipe_option_trains_keeps_the_last_layer_whole_and_load_run_adds_the_hooks(make_recipe, tiny_bert,
                                                                                      tmp_path, monkeypatch):
    import torch

    from finetune.run.inference import load_run
    from finetune.run.session import build_model, open_session
    from finetune.run.training import run_recipe
    from finetune_nlp.bert_layers import is_shortened

    on = ["task.pooling=mean"]
    model, _, _ = build_model(open_session(make_recipe(), on))
    assert not is_shortened(model)  # the mean needs every token of the last layer
    model, _, _ = build_model(open_session(make_recipe()))
    assert is_shortened(model)  # default "cls": unchanged
    run = run_recipe(make_recipe(train="epochs = 2", output=str(tmp_path / "run")), on, console=QUIET)
    task, loaded, processor, _ = load_run(run.path)
    assert task.recipe.task.pooling == "mean"
    records = [{"text": t} for t in TEXTS]
    batch = task.encode_records(processor, records, "cpu")

    def by_hand(mean: bool):
        """The run's adapter on the backbone loaded with plain transformers, with or without the hooks."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from finetune_nlp.mean_pooling import add_mean_pooling

        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), **task.head_config())
        if mean:
            add_mean_pooling(base)
        return PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()(**batch).logits

    with torch.no_grad():
        logits = loaded(**batch).logits
        torch.testing.assert_close(logits, by_hand(True), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(logits, by_hand(False))  # plain transformers reads [CLS] (documented)
    assert [p["pred_label"] for p in task.predict(loaded, processor, records)] == \
        [task.state["labels"][i] for i in logits.argmax(-1).tolist()]

    # the model card's usage snippet (plain transformers + peft, hooks written out) gives the same logits
    monkeypatch.chdir(run.path)
    namespace: dict = {}
    exec(task.usage_snippet(str(tiny_bert)), namespace)
    with torch.no_grad():
        expected = loaded(**processor(["some text"], return_tensors="pt")).logits
    torch.testing.assert_close(namespace["logits"], expected, rtol=1e-5, atol=1e-6)
    assert "task.pooling = \"mean\"" in (run.path / "README.md").read_text()


def test_mean_pooling_with_the_frozen_layer_cache_is_refused(make_recipe):
    from finetune.errors import RecipeError
    from finetune.run.session import build_model, open_session

    with pytest.raises(RecipeError, match="task.pooling = \"mean\" and task.cache_frozen_layers"):
        build_model(open_session(make_recipe(), ["task.pooling=mean", "task.cache_frozen_layers=true",
                                                 "peft.layers=[-1]"]))
