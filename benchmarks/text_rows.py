"""Data that grows: peak RSS and time to the first training step of `text-classification` on 10k, 100k and
1M rows, cold (nothing cached) and warm (the token arrays cached by the run before), against the code before
the token cache.

Workload: recipes/data/vader_sentiment.csv (5,830 rows, repeated until the table has N rows, so the texts
are real but repeat), all-MiniLM-L6-v2, LoRA r=8 on query,value, max_length 32, batch 32, split 0.2,
task.baseline = false (the TF-IDF baseline runs between model load and the first step; on big tables it
fits on a 50,000-row sample), train.eval_before_training = false (scoring the eval split before training
is not data loading), log every step. Each run is a fresh process; it is stopped (Ctrl-C, as a
user would) once the first training step is logged. Measured inside that process:

  load_s    process start -> the backbone loaded (imports, recipe, reading + splitting the table, model)
  data_s    backbone loaded -> train / eval datasets built (tokenizing, or reading the cache)
  first_s   backbone loaded -> the first training step logged (what the issue's 2 s goal is about)
  total_s   process start -> the first training step logged
  peak_mib  the process's peak RSS (VmHWM) at the first step
  arrays    the token arrays' bytes (the cache files; for the code before: not stored)

    .venv/bin/python benchmarks/text_rows.py [--rows 10000 100000 1000000] [--code DIR] [--label after]
        [--cache off|DIR] [--runs cold warm] [--out results.jsonl]

``--code DIR``: run the finetune code in DIR (e.g. a copy of the commit before the cache:
``git archive <commit> | tar -x -C /tmp/tok-base``) instead of this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import os, resource, signal, sys, time, json
T0 = time.perf_counter()
import finetune.run.training as training
from finetune import hookimpl
from finetune.engine.console import Console
from finetune.engine.plugins import get_registry
from finetune.engine.stop import Interrupted

marks = {}
build_model, speed_settings = training.build_model, training.speed_settings

def timed_build_model(*a, **k):
    out = build_model(*a, **k)
    marks["loaded"] = time.perf_counter()
    return out

def timed_speed_settings(*a, **k):
    marks["data"] = time.perf_counter()
    return speed_settings(*a, **k)

training.build_model, training.speed_settings = timed_build_model, timed_speed_settings

class FirstStep:
    def on_log(self, run, state, logs):
        if state.global_step >= 1 and "first" not in marks:
            marks["first"] = time.perf_counter()
            marks["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            os.kill(os.getpid(), signal.SIGINT)

class Plugin:
    @hookimpl
    def finetune_register_callbacks(self, register):
        register(FirstStep())

get_registry().pm.register(Plugin(), name="bench-first-step")
try:
    training.run_recipe(sys.argv[1], [], console=Console(quiet=True), overwrite=True)
except (Interrupted, KeyboardInterrupt):
    pass
print(json.dumps({"load_s": marks["loaded"] - T0, "data_s": marks["data"] - marks["loaded"],
                  "first_s": marks["first"] - marks["loaded"], "total_s": marks["first"] - T0,
                  "peak_mib": marks["peak_kib"] / 1024}))
'''


def make_table(rows: int, folder: Path) -> Path:
    import pandas as pd

    path = folder / f"vader_{rows}.csv"
    if not path.exists():
        base = pd.read_csv(REPO / "recipes" / "data" / "vader_sentiment.csv", keep_default_na=False)
        base = base[["text", "label"]]
        table = pd.concat([base] * (rows // len(base) + 1), ignore_index=True).head(rows)
        table.to_csv(path, index=False)
    return path


def recipe(table: Path, folder: Path) -> Path:
    path = folder / f"{table.stem}.toml"
    path.write_text(textwrap.dedent(f"""\
        [task]
        name = "text-classification"
        baseline = false
        [model]
        backbone = "sentence-transformers/all-MiniLM-L6-v2"
        [data]
        train = "{table}"
        split = 0.2
        max_length = 32
        [peft]
        r = 8
        alpha = 16
        [train]
        epochs = 1
        batch_size = 32
        log_every_steps = 1
        eval_before_training = false
        checkpoint_every_steps = 1000000
        seed = 0
        [output]
        dir = "{folder / ('run-' + table.stem)}"
        """))
    return path


def run_child(recipe_path: Path, code: Path, cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}:{code / 'plugins'}", "FINETUNE_TOKEN_CACHE": cache}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(recipe_path)], capture_output=True, text=True,
                          env=env, cwd=str(code))
    if proc.returncode:
        raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--code", type=Path, default=REPO)
    parser.add_argument("--label", default="after")
    parser.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--cache", default=None, help="FINETUNE_TOKEN_CACHE for the runs (default: a fresh "
                        "temporary folder, emptied before each cold run)")
    parser.add_argument("--work", type=Path, default=None, help="where the tables and runs go (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="append each result to this JSON-lines file")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="text-rows-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or str(work / "tokens")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average at start: {' '.join(load)}; code: {args.code}; cache: {cache}")
    for rows in args.rows:
        table = make_table(rows, work)
        path = recipe(table, work)
        for kind in args.runs:
            if kind == "cold" and cache != "off":
                shutil.rmtree(cache, ignore_errors=True)
            result = run_child(path, args.code, cache)
            arrays = sum(f.stat().st_size for f in Path(cache).glob("*.arrow")) if cache != "off" else None
            row = {"label": args.label, "rows": rows, "run": kind, **{k: round(v, 2) for k, v in result.items()},
                   "arrays_mib": None if arrays is None else round(arrays / 2**20, 1),
                   "load": Path("/proc/loadavg").read_text().split()[0]}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
