"""Evaluation (finetune.engine.evaluation): outputs gathered across batches and processes, also when
their widths differ from batch to batch (ragged), and the evaluation before training (step 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from fake_plugins import install_tagger, tagging_rows, write_jsonl

from finetune.engine.evaluation import GatheredOutputs
from finetune.engine.guard import GuardedTask
from finetune.errors import PluginError
from finetune.testing import tiny_text_backbone


class OneProcess:
    """What GatheredOutputs needs of an Accelerator, for one process."""

    def gather_for_metrics(self, value, use_gather_object=False):
        return value

    def pad_across_processes(self, value, dim, pad_index):
        return value


def _outputs(task_name="t"):
    class T:
        name = task_name

    return GatheredOutputs("predictions", GuardedTask(T(), "plugin 'p' (p-dist)"), -100)


def test_tensors_of_different_widths_are_padded_to_the_widest():
    out = _outputs()
    out.add(torch.tensor([[1, 2, 3], [4, 5, 6]]), OneProcess())
    out.add(torch.tensor([[7]]), OneProcess())
    out.add(torch.tensor([[8, 9, 10, 11]]), OneProcess())
    result = out.result()
    assert result.tolist() == [[1, 2, 3, -100], [4, 5, 6, -100], [7, -100, -100, -100], [8, 9, 10, 11]]
    assert result.dtype == np.int64


def test_more_dimensions_are_padded_each_and_floats_keep_their_type():
    out = _outputs()
    out.add(torch.ones(2, 2, 3), OneProcess())
    out.add(torch.zeros(1, 3, 1), OneProcess())
    result = out.result()
    assert result.shape == (3, 3, 3) and result.dtype == np.float32
    assert result[0, 2, 0] == -100 and result[2, 0, 1] == -100 and result[2, 2, 0] == 0


def test_lists_are_concatenated_per_example():
    out = _outputs()
    out.add([[1, 2], [3]], OneProcess())
    out.add([{"span": "x"}], OneProcess())
    assert out.result() == [[1, 2], [3], {"span": "x"}]


def test_a_tensor_in_one_batch_and_a_list_in_another_names_the_plugin():
    out = _outputs()
    out.add(torch.tensor([[1]]), OneProcess())
    with pytest.raises(PluginError, match=r"plugin 'p' \(p-dist\): T.evaluation_step returned 'predictions' as a "
                                          r"tensor in some batches and a list in others"):
        out.add([[1]], OneProcess())
    out = _outputs()
    out.add(torch.tensor([[1]]), OneProcess())
    out.add(torch.tensor([1]), OneProcess())
    with pytest.raises(PluginError, match=r"with \[1, 2\] dimensions in different batches"):
        out.result()


@pytest.fixture
def tagger(tmp_path, monkeypatch):
    site = install_tagger(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    data = write_jsonl(tmp_path / "tags.jsonl", tagging_rows(64))
    backbone = tiny_text_backbone(tmp_path / "bert", [w for r in tagging_rows(64) for w in r["tokens"]],
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def recipe(name: str, **task) -> str:
        path = tmp_path / f"{name}.toml"
        options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in task.items())
        path.write_text(f'[task]\nname = "word-tagging"\n{options}\n[model]\nbackbone = "{backbone}"\n\n'
                        f'[data]\ntrain = "{data}"\n\n[peft]\nr = 4\nalpha = 8\ndropout = 0.0\n\n'
                        '[train]\nepochs = 2\nbatch_size = 8\neval_batch_size = 4\nlearning_rate = 1e-2\n'
                        f'mixed_precision = "no"\nseed = 0\n\n[output]\ndir = "{tmp_path / name}"\n')
        return str(path)

    return {"env": {"PYTHONPATH": str(site)}, "recipe": recipe, "path": tmp_path,
            "tokens": sum(len(r["tokens"]) for r in tagging_rows(64)[:16])}


def test_evaluate_tells_the_task_which_examples_it_scores():
    """``Task.evaluating``: "eval" (may tune), "test", "input", set before evaluation_step / compute_metrics."""
    import contextlib

    from finetune.engine.evaluation import evaluate

    class Recorder:
        name = "recorder"
        seen: list[tuple[str, str]] = []

        def evaluation_step(self, model, batch):
            self.seen.append(("step", self.evaluating))
            return {"loss": torch.tensor(0.5), "predictions": batch["x"], "references": batch["x"]}

        def compute_metrics(self, predictions, references):
            self.seen.append(("metrics", self.evaluating))
            return {"count": len(predictions)}

        def finalize_eval(self, metrics):
            return metrics

    class Accelerator(OneProcess):
        def autocast(self):
            return contextlib.nullcontext()

    task, model = GuardedTask(Recorder(), "plugin 'p' (p-rec)"), torch.nn.Linear(1, 1)
    loader = [{"x": torch.arange(3.0)}]
    for split in ("eval", "test", "input"):
        Recorder.seen = []
        assert evaluate(task, model, loader, Accelerator(), split)["count"] == 3
        assert Recorder.seen == [("step", split), ("metrics", split)]
    with pytest.raises(ValueError, match="'eval', 'test', 'input'"):
        evaluate(task, model, loader, Accelerator(), "train")


def test_ragged_outputs_reach_compute_metrics_whole_with_1_and_2_processes(tagger):
    runs = {}
    for processes in (1, 2):
        extra = ["--num-processes", "2"] if processes == 2 else []
        result = run_cli("run", tagger["recipe"](f"run{processes}"), *extra, env=tagger["env"])
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = runs[processes] = json.loads((tagger["path"] / f"run{processes}" / "metrics.json").read_text())
        for which in ("before", "best", "last"):  # every word of every eval sentence, once
            assert metrics[which]["examples"] == 16 and metrics[which]["tokens"] == tagger["tokens"], which
        assert metrics["before"]["step"] == 0
        assert metrics["best"]["token_accuracy"] > metrics["before"]["token_accuracy"]
    # the same untouched model evaluated by one process or by two: the same number
    assert runs[2]["before"]["token_accuracy"] == pytest.approx(runs[1]["before"]["token_accuracy"])
