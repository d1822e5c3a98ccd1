"""Threads and OpenMP wait policy: finetune's automatic choice vs each manual setting, on an idle machine and
beside a bounded synthetic load (one busy process per core, started and stopped by this script).

    .venv/bin/python benchmarks/threads.py [--epochs 1] [--states idle,busy] [--repeats 1]

The workload is the text quickstart (recipes/text-quickstart.toml, `train.epochs` from --epochs). Each
setting runs in a fresh `finetune run` process (settings interleaved, A B C A B C) with no OMP_* variables
in its environment; the manual settings are given as `--set train.threads=N --set train.wait_policy=P`.
Reported: training time (the loop's own `train_time_s`, without model loading; median of --repeats),
samples/s, wall time of the process, and what `auto` chose (run.json `threads`).
Goal: `auto` within 10% of the best manual setting in both states.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def settings(cores: int) -> list[tuple[str, list[str]]]:
    out = [("auto", [])]
    for threads in sorted({cores, 1}, reverse=True):
        for policy in ("default", "passive", "active"):
            out.append((f"{threads} thread{'s' if threads > 1 else ''}, {policy}",
                        [f"train.threads={threads}", f"train.wait_policy={policy}"]))
    return out


def run_once(exe: str, overrides: list[str], epochs: int, out_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    cmd = [exe, "run", str(REPO / "recipes" / "text-quickstart.toml"), "-q", "--overwrite",
           "--set", f"output.dir={out_dir}", "--set", f"train.epochs={epochs}"]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    info = json.loads((out_dir / "run.json").read_text())
    return {"train_s": metrics["train"]["train_time_s"], "samples_per_s": metrics["train"]["samples_per_s"],
            "wall_s": wall, "chose": info.get("threads", {}), "accuracy": metrics["best"].get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--states", default="idle,busy")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="", help="setting names to run, separated by ';' (default: all)")
    args = parser.parse_args()
    exe = shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"
    cores = len(os.sched_getaffinity(0))
    chosen = settings(cores)
    if args.only:
        wanted = {s.strip() for s in args.only.split(";")}
        chosen = [s for s in chosen if s[0] in wanted]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for state in args.states.split(","):
            load = []
            if state == "busy":
                load = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(cores)]
                time.sleep(2)
            try:
                for r in range(args.repeats):  # interleaved (A B C A B C): a drift in load hits every setting
                    for name, overrides in chosen:
                        res = run_once(exe, overrides, args.epochs, Path(tmp) / f"{state}-{r}")
                        rows.append((state, name, res))
                        print(f"{state:5s} {name:22s} train {res['train_s']:7.1f} s  "
                              f"{res['samples_per_s']:7.1f} samples/s  wall {res['wall_s']:6.1f} s"
                              + (f"  auto chose: {res['chose'].get('threads')} / {res['chose'].get('wait_policy')}"
                                 if name == "auto" else ""), flush=True)
            finally:
                for p in load:
                    p.kill()
                    p.wait()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {cores} usable cores, text quickstart x {args.epochs} epoch(s)\n")
    print("| machine | setting | train s (median) | each repeat | samples/s | wall s | vs best manual |\n"
          "|---|---|---|---|---|---|---|")
    for state in args.states.split(","):
        mine: dict[str, list[dict]] = {}
        for s, n, r in rows:
            if s == state:
                mine.setdefault(n, []).append(r)
        med = {n: statistics.median(r["train_s"] for r in rs) for n, rs in mine.items()}
        manual = [v for n, v in med.items() if n != "auto"]
        best = min(manual) if manual else None
        for name, rs in mine.items():
            ratio = f"{med[name] / best:.2f}x" if best else ""
            chose = rs[0]["chose"]
            label = name if name != "auto" else f"auto ({chose.get('threads')}, {chose.get('wait_policy')})"
            each = ", ".join(f"{r['train_s']:.1f}" for r in rs)
            sps = statistics.median(r["samples_per_s"] for r in rs)
            wall = statistics.median(r["wall_s"] for r in rs)
            print(f"| {state} | {label} | {med[name]:.1f} | {each} | {sps:.1f} | {wall:.1f} | {ratio} |")

if __name__ == "__main__":
    main()
