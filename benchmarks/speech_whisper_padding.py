"""Whisper padded to 30 s vs truncated to the clip, same recipe, same split, same run of this script.

    .venv/bin/python benchmarks/speech_whisper_padding.py                # the quickstart (180 train clips, 3 epochs)
    .venv/bin/python benchmarks/speech_whisper_padding.py --limit 40 --epochs 1   # a quick look
    .venv/bin/python benchmarks/speech_whisper_padding.py --seeds 0 1 2 3         # accuracy over 4 splits

Each mode is a separate `finetune run` of recipes/speech-quickstart.toml with
`task.whisper_input` = "30s" (Whisper's pre-training input: every clip padded to 3000 log-mel frames)
or "clip" (features truncated to the batch's longest clip, positional embeddings sliced). Prints
training clips/s, eval accuracy and the process's peak memory (features are computed per batch in
both modes, so memory stays bounded even when padding to 30 s).

One split has only 60 eval clips (6 held-out voices), so one clip is 1.7 points of accuracy. With
several ``--seeds`` each seed holds out different voices and initialises LoRA differently; both
modes see the same split for a seed, and the table adds the eval clips pooled over all seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "run", str(REPO / "recipes" / "speech-quickstart.toml"),
           "--set", f"task.whisper_input=\"{mode}\"", "--set", f"train.epochs={args.epochs}",
           "--set", f"train.seed={seed}",
           "--set", "task.baseline=false", "--set", f"output.dir=\"{out}\""]
    if args.limit:
        cmd += ["--set", f"data.limit={args.limit}"]
    start = time.perf_counter()
    quiet = None if args.verbose else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=quiet, stderr=quiet)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{mode}: finetune run failed (status {status}); rerun with --verbose")
    m = json.loads((out / "metrics.json").read_text())
    eval_clips = m["data"]["eval_examples"]
    return {"mode": mode, "seed": seed, "clips_per_s": m["train"]["samples_per_s"],
            "accuracy": m["best"]["accuracy"], "last_accuracy": m["last"]["accuracy"], "wall_s": wall,
            "eval_clips": eval_clips,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="train on at most this many clips (0: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="train.seed values: each holds out different voices (default: 0, the quickstart's)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in ("30s", "clip"):
                rows.append(run(mode, seed, args, Path(tmp) / f"{mode}-{seed}"))
                r = rows[-1]
                print(f"  seed {seed} {mode}: {r['clips_per_s']:.2f} clips/s, accuracy {r['accuracy']:.3f}, "
                      f"{r['wall_s']:.0f} s", file=sys.stderr)
    print(f"\nWhisper tiny.en + LoRA, speech commands, {args.epochs} epoch(s)"
          f"{f', {args.limit} train clips' if args.limit else ''}, seeds {args.seeds}\n")
    print("| seed | input | train clips/s | speed-up | best accuracy | last accuracy | eval clips | wall s | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["seed"] == r["seed"] and b["mode"] == "30s")["clips_per_s"]
        print(f"| {r['seed']} | {r['mode']} | {r['clips_per_s']:.2f} | {r['clips_per_s'] / base:.1f}x | "
              f"{r['accuracy']:.3f} | {r['last_accuracy']:.3f} | {r['eval_clips']} | {r['wall_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if len(args.seeds) > 1:
        print("\nPooled over seeds (eval clips correct / total; speed-up of the mean clips/s):\n")
        print("| input | mean clips/s | speed-up | best: correct / clips | last: correct / clips |")
        print("|---|---|---|---|---|")
        means = {}
        for mode in ("30s", "clip"):
            mine = [r for r in rows if r["mode"] == mode]
            means[mode] = sum(r["clips_per_s"] for r in mine) / len(mine)
            total = sum(r["eval_clips"] for r in mine)
            best = sum(round(r["accuracy"] * r["eval_clips"]) for r in mine)
            last = sum(round(r["last_accuracy"] * r["eval_clips"]) for r in mine)
            print(f"| {mode} | {means[mode]:.2f} | {means[mode] / means['30s']:.1f}x | {best} / {total} "
                  f"({best / total:.3f}) | {last} / {total} ({last / total:.3f}) |")


if __name__ == "__main__":
    main()
