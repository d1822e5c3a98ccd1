"""Batching (finetune.contract.batching and Task.train_batches): every example once per epoch, less
padding with length grouping, random epochs, and exact resume of grouped batches."""

from __future__ import annotations

import math

import pytest

from finetune import epoch_batches, length_grouped_batches
from finetune.engine.console import Console
from finetune.run.training import run_recipe

QUIET = Console(enabled=False)


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
    from finetune.run.session import build_model, open_session

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
