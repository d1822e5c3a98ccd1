"""Whisper padded to 30 s vs truncated to the clip, same recipe, same split, same run of this script.

    .venv/bin/python benchmarks/speech_whisper_padding.py                # the quickstart (180 train clips, 3 epochs)
    .venv/bin/python benchmarks/speech_whisper_padding.py --limit 40 --epochs 1   # a quick look

Each mode is a separate `finetune run` of recipes/speech-quickstart.toml with
`task.whisper_input` = "30s" (Whisper's pre-training input: every clip padded to 3000 log-mel frames)
or "clip" (features truncated to the batch's longest clip, positional embeddings sliced). Prints
training clips/s, eval accuracy and the process's peak memory (features are computed per batch in
both modes, so memory stays bounded even when padding to 30 s).
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


def run(mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "finetune.cli", "run", str(REPO / "recipes" / "speech-quickstart.toml"),
           "--set", f"task.whisper_input=\"{mode}\"", "--set", f"train.epochs={args.epochs}",
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
    return {"mode": mode, "clips_per_s": m["train"]["samples_per_s"], "accuracy": m["best"]["accuracy"],
            "last_accuracy": m["last"]["accuracy"], "wall_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="train on at most this many clips (0: all)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("30s", "clip"):
            rows.append(run(mode, args, Path(tmp) / mode))
            print(f"  {mode}: done in {rows[-1]['wall_s']:.0f} s", file=sys.stderr)
    base = rows[0]["clips_per_s"]
    print(f"\nWhisper tiny.en + LoRA, speech commands, {args.epochs} epoch(s)"
          f"{f', {args.limit} train clips' if args.limit else ''}\n")
    print("| input | train clips/s | speed-up | best accuracy | last accuracy | wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}"
        print(f"| {r['mode']} | {r['clips_per_s']:.2f} | {r['clips_per_s'] / base:.1f}x | {r['accuracy']:.3f} | "
              f"{r['last_accuracy']:.3f} | {r['wall_s']:.0f} | {rss} |")


if __name__ == "__main__":
    main()
