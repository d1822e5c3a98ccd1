"""Transfer vs from scratch on the vision quickstart: same recipe, same split, same epochs.

    .venv/bin/python benchmarks/vision_transfer.py            # pretrained LoRA vs from-scratch full training
    .venv/bin/python benchmarks/vision_transfer.py --all      # also linear probe and LoRA on a random backbone
    .venv/bin/python benchmarks/vision_transfer.py --only 2 3 # just those two
    .venv/bin/python benchmarks/vision_transfer.py --set train.epochs=1 --set data.limit=400   # quick look

The from-scratch baseline is the fair one: the same architecture from random initialisation, every
parameter trained and BatchNorm in train mode (``task.init = "random"``, ``peft.method = "full"``).
LoRA on a random backbone (``--all``) is shown only to say why it is not the baseline.
Prints a markdown table; run folders go to runs/bench-vision-*/ beside the recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "vision-quickstart.toml"

VARIANTS = {
    "pretrained + LoRA (quickstart)": [],
    "random init + full training (from scratch)": ["task.init=\"random\"", "peft.method=\"full\""],
    "pretrained + linear probe": ["peft.method=\"none\""],
    "random init + LoRA (strawman)": ["task.init=\"random\""],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also the linear probe and LoRA on a random backbone")
    parser.add_argument("--only", type=int, nargs="+", help="variant numbers to run (0-3, in the order above)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()

    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    indices = args.only if args.only else (range(len(VARIANTS)) if args.all else range(2))
    rows = []
    for i in indices:
        name = list(VARIANTS)[i]
        out = RECIPE.parent / "runs" / f"bench-vision-{i}"
        start = time.perf_counter()
        run = run_recipe(RECIPE, [*VARIANTS[name], *args.overrides, f"output.dir=\"{out}\""], overwrite=True,
                         console=Console(quiet=True))
        wall = time.perf_counter() - start
        m = json.loads(run.metrics_file.read_text())
        rows.append((name, m["best"]["accuracy"], m["best"]["macro_f1"], m["train"]["samples_per_s"], wall,
                     m["params"]["trainable"]))
        print(f"done: {name}: accuracy {m['best']['accuracy']:.3f} in {wall:.0f} s", flush=True)
    print()
    print("| model | accuracy | macro-F1 | train images/s | wall time | trainable params |")
    print("|---|---|---|---|---|---|")
    for name, acc, f1, speed, wall, params in rows:
        print(f"| {name} | {acc:.3f} | {f1:.3f} | {speed} | {wall:.0f} s | {params:,} |")


if __name__ == "__main__":
    main()
