"""Speed features: length-grouped batches, LoRA in some layers, the frozen-prefix cache, and
the loop's deferred loss reads. Speed itself is measured in benchmarks/, not here: these tests
check that each feature does what it says and that results stay correct."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from finetune import epoch_batches, length_grouped_batches
from finetune.console import Console
from finetune.errors import RecipeError
from finetune.runner import run_recipe

QUIET = Console(enabled=False)


# -- length-grouped batches ------------------------------------------------------------------

@pytest.mark.parametrize("n,batch_size", [(1000, 32), (37, 8), (5, 16), (160, 16)])
def test_length_grouped_batches_cover_every_example_once(n, batch_size):
    import random

    lengths = [random.Random(i).randint(1, 64) for i in range(n)]
    batches = length_grouped_batches(lengths, batch_size, seed=3, epoch=1)
    assert len(batches) == math.ceil(n / batch_size) == len(epoch_batches(n, batch_size, 3, 1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1  # at most one short batch, like a plain cut


def test_length_grouped_batches_cut_padding_and_stay_random():
    import random

    rng = random.Random(0)
    lengths = [min(64, int(rng.expovariate(1 / 20)) + 3) for _ in range(4000)]  # short texts, long tail

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = padded(epoch_batches(len(lengths), 32, 0, 0))
    grouped = padded(length_grouped_batches(lengths, 32, 0, 0))
    assert grouped < 0.6 * plain, (grouped, plain)
    assert grouped < 1.1 * sum(lengths)
    # deterministic per (seed, epoch) -- exact resume replays it -- and different across epochs and seeds
    assert length_grouped_batches(lengths, 32, 0, 0) == length_grouped_batches(lengths, 32, 0, 0)
    e0, e1 = length_grouped_batches(lengths, 32, 0, 0), length_grouped_batches(lengths, 32, 0, 1)
    assert {tuple(sorted(b)) for b in e0} != {tuple(sorted(b)) for b in e1}
    assert e0 != length_grouped_batches(lengths, 32, 1, 0)
    # the batch order is shuffled: long and short batches are interleaved, not sorted
    widths = [max(lengths[i] for i in b) for b in e0]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_small_dataset_batches_change_between_epochs():
    """A small dataset still gets several independently drawn groups, so batch composition is not
    the same every epoch (a whole-epoch sort would repeat the same batches)."""
    lengths = list(range(1, 121))  # all different: a full sort would fix the batches
    compositions = {frozenset(tuple(sorted(b)) for b in length_grouped_batches(lengths, 16, 0, e)) for e in range(4)}
    assert len(compositions) == 4


def test_text_task_groups_training_batches_by_length(make_recipe, tmp_path):
    from conftest import write_csv

    rows = [{"text": " ".join(["good"] * (1 + i % 12)), "label": "pos" if i % 2 else "neg"} for i in range(96)]
    data = write_csv(tmp_path / "varied.csv", rows)
    from finetune.runner import build_model, open_session

    session = open_session(make_recipe(data=f'train = "{data}"'))
    _, processor, _ = build_model(session)
    task = session.task
    ds = task.build_dataset(session.splits.train, processor, training=True)
    lengths = task.example_lengths(ds)
    assert lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    grouped = task.train_batches(ds, 8, 0, 0)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped)
    session.recipe.train.group_by_length = False
    plain = task.train_batches(ds, 8, 0, 0)
    assert plain == epoch_batches(len(ds), 8, 0, 0)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 2


def test_grouped_run_resumes_exactly(make_recipe, tmp_path, monkeypatch):
    """Crash a length-grouped run mid-epoch, resume: the same adapter as an uninterrupted run."""
    import torch
    from conftest import write_csv
    from safetensors.torch import load_file

    from finetune_nlp.text_classification import TextClassification

    rows = [{"text": " ".join(["good", "fine"][: 1 + i % 2] + ["film"] * (i % 7)), "label": "pos" if i % 3 else "neg"}
            for i in range(120)]
    data = write_csv(tmp_path / "varied.csv", rows)
    full = run_recipe(make_recipe(data=f'train = "{data}"', output=str(tmp_path / "a")), [], console=QUIET)
    calls = {"n": 0}
    original = TextClassification.training_loss

    def crash_at_8(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("simulated crash")
        return original(self, model, batch)

    monkeypatch.setattr(TextClassification, "training_loss", crash_at_8)
    recipe = make_recipe(data=f'train = "{data}"', output=str(tmp_path / "b"), name="b.toml")
    with pytest.raises(Exception, match="simulated crash"):
        run_recipe(recipe, [], console=QUIET)
    monkeypatch.setattr(TextClassification, "training_loss", original)
    resumed = run_recipe(recipe, [], resume=True, console=QUIET)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


# -- LoRA in some layers ---------------------------------------------------------------------

def test_peft_layers_places_lora_only_there(make_recipe):
    run = run_recipe(make_recipe(train="epochs = 1"), ["peft.layers=[-1]"], console=QUIET)
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]  # the tiny model has 2 layers
    from safetensors.torch import load_file

    keys = [k for k in load_file(str(run.adapter_dir / "adapter_model.safetensors")) if "lora_" in k]
    assert keys and all(".layer.1." in k for k in keys)


@pytest.mark.parametrize("override,fragment", [
    (["peft.layers=[2]"], "out of range: this model has 2 layers"),
    (["peft.layers=[-3]"], "out of range"),
    (["peft.layers=[]"], "out of range"),
    (["peft.layers=[1]", 'peft.method="full"'], "does not apply to peft.method"),
])
def test_bad_peft_layers(make_recipe, tmp_path, override, fragment):
    with pytest.raises(RecipeError, match=r"peft\.layers") as err:
        run_recipe(make_recipe(), override, console=QUIET)
    assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()


def test_bad_peft_layers_on_the_command_line_is_one_clear_paragraph(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), "--set", "peft.layers=[7]")
    assert result.returncode != 0
    assert "peft.layers" in result.stderr and "out of range" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# -- the frozen-prefix cache -----------------------------------------------------------------

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

    from finetune import FrozenPrefixCache

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
    from finetune import FrozenPrefixCache

    model = _cache_model(tiny_bert)
    cache = FrozenPrefixCache(model, 1)
    cache.train_mode(model)
    base = model.get_base_model()
    assert not base.bert.embeddings.training and not base.bert.encoder.layer[0].training
    assert base.bert.encoder.layer[1].training and base.classifier.training


def test_prefix_cache_refuses_a_trainable_prefix(tiny_bert):
    from finetune import FrozenPrefixCache

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
    from finetune.runner import dry_run

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


def test_speed_settings_are_reported_by_validate(make_recipe):
    shown = run_cli("validate", str(make_recipe()))
    assert shown.returncode == 0
    assert "speed setting:    train.group_by_length" in shown.stdout
    assert "speed setting:    train.fast_dropout" in shown.stdout
    assert "speed setting:    task.last_layer_cls_only" in shown.stdout
    from finetune.runner import dry_run

    info = dry_run(make_recipe(), ["train.group_by_length=false", "train.fast_dropout=false",
                                   "task.last_layer_cls_only=false"], QUIET)
    assert info["speed_settings"] == []


# -- the loop reads losses at sync points only ------------------------------------------------

def test_deferred_loss_reads_still_stop_a_bad_run_before_its_checkpoint(make_recipe, monkeypatch):
    """As on a GPU: losses are read only at log/eval/checkpoint points. A NaN at step 4 (between
    the step-3 checkpoint and the step-6 one) is reported with its step, and no checkpoint holds it."""
    import torch
    from safetensors.torch import load_file

    from finetune import loop
    from finetune.errors import TrainingError
    from finetune.runs import RunDir
    from finetune_nlp.text_classification import TextClassification

    monkeypatch.setattr(loop, "READ_LOSS_EVERY_STEP", False)
    calls = {"n": 0}
    original = TextClassification.training_loss

    def flaky(self, model, batch):
        calls["n"] += 1
        loss = original(self, model, batch)
        return loss * torch.tensor(float("nan")) if calls["n"] >= 4 else loss

    monkeypatch.setattr(TextClassification, "training_loss", flaky)
    recipe = make_recipe(train="log_every_steps = 5\ncheckpoint_every_steps = 3\nepochs = 3")
    with pytest.raises(TrainingError, match=r"loss became nan at step 4 "):
        run_recipe(recipe, [], console=QUIET)
    run = RunDir(recipe.parent / "run")
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and ckpt.name.endswith("3")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# -- fast dropout masks on CPU --------------------------------------------------------------

def test_fast_dropout_drops_p_scales_and_follows_torch_seed():
    import torch

    from finetune.fast_dropout import fast_dropout_module

    drop = fast_dropout_module(0.1)
    x = torch.ones(200, 1000)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # expectation preserved
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded by torch's RNG: reproducible, exact resume
    assert not torch.equal(drop(x), y)  # and a new mask on every call
    drop.eval()
    assert torch.equal(drop(x), x)
    # gradients flow through the kept elements only, scaled
    drop.train()
    w = torch.ones(50, 40, requires_grad=True)
    torch.manual_seed(1)
    out = drop(w)
    out.sum().backward()
    assert torch.allclose(w.grad, (out != 0).float() / 0.9)


def test_fast_dropout_mask_is_the_documented_pcg64_draw():
    """The mask is a function of torch's RNG state only (seed -> PCG64 lanes >= round(p * 65536)), so a
    checkpoint resumes with the same masks whichever way the mask is built."""
    import numpy as np
    import torch

    from finetune.fast_dropout import fast_dropout_module

    x = torch.randn(3, 7, 11)
    torch.manual_seed(7)
    y = fast_dropout_module(0.25)(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)))
    lanes = np.random.PCG64(seed).random_raw((x.numel() + 3) // 4).view(np.uint16)[:x.numel()]
    keep = torch.from_numpy(lanes >= 16384).view(x.shape)
    assert torch.equal(y, torch.where(keep, x * np.float32(1 / 0.75), torch.zeros_like(x)))


def test_fast_dropout_is_installed_on_cpu_and_reported(make_recipe):
    import torch

    from finetune.runner import build_model, open_session

    session = open_session(make_recipe())
    model, _, report = build_model(session)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert kinds == {"FastDropout"} and report.fast_dropout_modules > 0
    lora_dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert lora_dropouts and all(type(m).__name__ == "FastDropout" for m in lora_dropouts)
    off = open_session(make_recipe(train="fast_dropout = false"))
    model, _, report = build_model(off)
    assert report.fast_dropout_modules == 0
    assert {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {"Dropout"}


def test_freed_heap_pages_are_released_around_every_evaluation(make_recipe, monkeypatch):
    """Before and after each evaluation the loop hands the heap's free pages back (glibc malloc_trim), so
    training's freed buffers do not raise the evaluation's peak resident memory, nor the eval's larger
    batches the peak of the training that follows."""
    import platform
    import sys

    from finetune import loop

    calls = []
    real = loop.release_freed_memory
    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append(real()) or calls[-1])
    run = run_recipe(make_recipe(train="epochs = 2\neval_every_steps = 3"), [], console=Console(quiet=True))
    evals = [r for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert len(calls) == 2 * len(evals) >= 6
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert loop._LIBC[0] is not None and all(isinstance(c, bool) for c in calls)


def test_training_time_counts_batch_loading_but_not_evaluation(make_recipe, monkeypatch):
    """train.samples_per_s compares with a Trainer's train() time: loading and collating batches is part
    of it, evaluation is not."""
    import time

    from finetune_nlp.text_classification import TextClassification

    pause, collates, evals = 0.03, [], []
    make_collate, evaluation_step = TextClassification.collate_fn, TextClassification.evaluation_step

    def slow_collate_fn(self, processor):
        fn = make_collate(self, processor)
        return lambda items: (collates.append(time.sleep(pause)), fn(items))[1]

    def slow_evaluation_step(self, model, batch):
        evals.append(time.sleep(4 * pause))
        return evaluation_step(self, model, batch)

    monkeypatch.setattr(TextClassification, "collate_fn", slow_collate_fn)
    monkeypatch.setattr(TextClassification, "evaluation_step", slow_evaluation_step)
    run = run_recipe(make_recipe(), [], console=QUIET)
    train = json.loads((run.path / "metrics.json").read_text())["train"]
    train_collates = len(collates) - len(evals)  # every evaluated batch was collated once too
    assert train_collates >= train["steps"] > 0
    assert train["train_time_s"] >= train_collates * pause
    assert train["train_time_s"] < train["wall_time_s"] - len(evals) * 5 * pause
