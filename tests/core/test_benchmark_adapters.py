"""benchmarks/adapters.py (the adapter-method comparison): its runs, the numbers it reads from run folders and its
tables. The real benchmark (the quickstarts) is not run here; the script runs on the tiny text fixture instead."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "adapters.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_adapters", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_runs_each_method_on_a_recipe_and_tabulates_what_the_runs_recorded(make_recipe, tmp_path):
    recipe = make_recipe()
    out = tmp_path / "tables.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workloads", "text", "--methods", "ia3,full", "--recipe",
         f"text={recipe}", "--epochs", "1", "--limit", "60", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == ["ia3", "full"]
    for method, row in rows.items():
        run = Path(row["run"])
        saved = tomllib.loads((run / "recipe.toml").read_text())
        # each run got its method and that method's learning rate from the table, and the overrides
        assert saved["peft"]["method"] == method
        assert saved["train"]["learning_rate"] == pytest.approx(row["learning_rate"])
        assert saved["train"]["epochs"] == 1 and saved["data"]["limit"] == 60
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["metric"] == metrics["selection_metric"] == "accuracy"
        assert row["value"] == metrics["best"]["accuracy"]
        assert row["train_time_s"] == metrics["train"]["train_time_s"] > 0
        assert row["peak_rss_mib"] > 50 and row["wall_s"] > 0
        assert row["adapter_bytes"] > 0
    assert rows["ia3"]["learning_rate"] == 3e-3 and rows["full"]["learning_rate"] == 3e-5  # the script's table
    # what trains, as the runs counted it: IA3 a few vectors (and the head), full everything
    assert rows["ia3"]["trainable"] < rows["full"]["trainable"] == rows["full"]["total"]
    assert rows["ia3"]["adapter_bytes"] < rows["full"]["adapter_bytes"]

    table = out.read_text()
    assert table.startswith("### text\n")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | lr | accuracy (best) | trainable params |")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| ia3", "| full"]
    assert "| 100.00 % |" in lines[2]
    assert table in proc.stdout


def _fake_run(path: Path, *, metric: str, value: float, trainable: int, total: int, weights: int) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * weights)
    (path / "adapter" / "tokenizer.json").write_bytes(b"\0" * 5000)  # not weights: not counted
    (path / "metrics.json").write_text(json.dumps({
        "selection_metric": metric, "selection_mode": "min" if metric == "eval_loss" else "max",
        "best": {"step": 7, metric: value}, "before": {"step": 0, metric: value + 1},
        "train": {"train_time_s": 12.25, "steps": 7}, "params": {"trainable": trainable, "total": total}}))
    return path


def test_rows_and_tables_from_run_folders(tmp_path):
    bench = _module()
    a = bench.collect(_fake_run(tmp_path / "a", metric="eval_loss", value=0.4321, trainable=1_000, total=200_000,
                                weights=3 * 1024 * 1024), workload="generation", method="lora", wall_s=61.04,
                      peak_mib=2048, lr=2e-3)
    assert a["adapter_bytes"] == 3 * 1024 * 1024 and a["before"] == pytest.approx(1.4321) and a["mode"] == "min"
    a["correct"] = 0.57
    b = bench.collect(_fake_run(tmp_path / "b", metric="eval_loss", value=0.5, trainable=2_000, total=200_000,
                                weights=100), workload="generation", method="prompt-tuning", lr=3e-2)
    failed = {"workload": "generation", "method": "full", "learning_rate": 2e-5, "error": "DataError: boom"}
    text = bench.tables([a, b, failed])
    assert text.splitlines()[0] == "### generation"
    assert "| method | lr | eval_loss (best) | correct (held-out) | trainable params |" in text
    assert "| lora | 0.002 | 0.4321 | 0.57 | 1,000 | 0.50 % | 12.2 s | 61 s | 2,048 MiB | 3.0 MiB |" in text
    assert "| prompt-tuning | 0.03 | 0.5000 | - | 2,000 | 1.00 % | 12.2 s | - | - | 100 B |" in text
    assert "| full | 2e-05 | failed: DataError: boom |" in text
    stderr = ("finetune run ... failed:\nLoading weights: 100%|###|\nerror: invalid recipe:\n"
              "  train.epochz: unknown key (did you mean 'epochs'?).\n  (recipe: r.toml)\n")
    assert bench.error_summary(stderr) == "error: invalid recipe: train.epochz: unknown key (did you mean 'epochs'?)."
    assert bench.error_summary("cmd failed:\nTraceback ...\nRuntimeError: x | y\n") == "RuntimeError: x / y"


def test_every_method_has_a_learning_rate_with_its_source_and_unknown_names_are_refused(capsys):
    bench = _module()
    assert set(bench.LEARNING_RATES) == set(bench.METHODS)
    for method, (_, source) in bench.LEARNING_RATES.items():
        assert len(source) > 20, method
        for workload in bench.WORKLOADS:
            assert 1e-6 < bench.learning_rate(method, workload, 1e-3) < 1
    assert bench.learning_rate("lora", "text", 1e-2) == bench.learning_rate("dora", "vision", 1e-2) == 1e-2  # recipe's
    assert bench.learning_rate("lora+", "text", 1e-3) == pytest.approx(5e-4)
    assert bench.learning_rate("full", "vision", 1e-3) == 1e-4
    with pytest.raises(SystemExit) as err:
        bench.main(["--methods", "lora,qlora"])
    assert err.value.code == 2 and "unknown method 'qlora'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--recipe", "audio=x.toml"])
    assert "expected WORKLOAD=PATH" in capsys.readouterr().err
