"""Adapter methods side by side: the text, vision and generation quickstarts with each ``peft.method``.

Every (workload, method) pair is one ``finetune run RECIPE --set peft.method=... --set train.learning_rate=...``
in a fresh process (so the peak memory is that run's own), and the table per workload gives:

- the recipe's selection metric at the best checkpoint (``metrics.json`` ``best``; on the eval split, which
  selected that checkpoint, so slightly optimistic, equally for every method),
- trainable and total parameters (``metrics.json`` ``params``, what the run counted),
- train time (``metrics.json`` ``train.train_time_s``: the training loop only, without model loading and evals),
- wall time and peak RSS of the whole process (``benchmarks/common.py`` ``timed``),
- the size on disk of the weights the run saved in ``adapter/`` (``*.safetensors`` / ``*.bin``; the
  tokenizer and the cards are not counted).

    .venv/bin/python benchmarks/adapters.py                                    # everything (long)
    .venv/bin/python benchmarks/adapters.py --workloads text --epochs 1        # one workload, shorter
    .venv/bin/python benchmarks/adapters.py --workloads text --methods lora,ia3 --limit 300   # smoke run
    .venv/bin/python benchmarks/adapters.py --workloads generation --correctness --out runs/adapters.md

``--out FILE`` writes the tables (markdown) and ``FILE`` with ``.json`` as suffix (every row, with the
commands). ``--correctness`` also scores each generation run on the 100 held-out prompts with
``benchmarks/arithmetic_correctness.py`` (greedy; about a minute per run on 2 CPU cores).
``--recipe text=PATH`` runs a workload on another recipe (your own data), with the same methods.
Run folders go to ``runs/bench-adapters/<workload>-<method>/`` (``--runs-dir``) and are replaced.

Learning rates: one per method, from the method's paper or PEFT's documentation, never tuned on the eval
split (see ``LEARNING_RATES``). The LoRA family keeps the recipe's own rate (what the quickstart was set up
with), so the LoRA row is the quickstart itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

WORKLOADS = {
    "text": REPO / "recipes" / "text-quickstart.toml",
    "vision": REPO / "recipes" / "vision-quickstart.toml",
    "generation": REPO / "recipes" / "generation-quickstart.toml",
}

# method -> (recipe overrides, workloads it applies to (None: all))
METHODS: dict[str, tuple[list[str], tuple[str, ...] | None]] = {
    "lora": (['peft.method="lora"'], None),
    "dora": (['peft.method="dora"'], None),
    "rslora": (['peft.method="lora"', "peft.use_rslora=true"], None),
    "lora+": (['peft.method="lora"', "peft.loraplus_lr_ratio=16"], None),
    "ia3": (['peft.method="ia3"'], None),
    "prompt-tuning": (['peft.method="prompt-tuning"'], ("generation",)),
    "head-only": (['peft.method="none"'], ("text", "vision")),
    "full": (['peft.method="full"'], None),
}

# method -> (learning rate: a number, or "recipe" / a factor of the recipe's rate as ("x", f); per-workload
# values as a dict), where the value comes from. Fixed before the runs; never tuned on the eval split.
LEARNING_RATES: dict[str, tuple[object, str]] = {
    "lora": ("recipe", "the quickstart recipe's own rate (1e-3 text, 2e-3 vision and generation)"),
    "dora": ("recipe", "as LoRA: the DoRA paper (Liu et al. 2024) reuses LoRA's hyperparameters"),
    "rslora": ("recipe", "as LoRA: rsLoRA (Kalajdzievski 2023) only changes the scaling to alpha/sqrt(r)"),
    "lora+": (("x", 0.5), "half the recipe's rate for A, B 16x that (ratio 16 = 2^4, the LoRA+ paper's "
                          "suggestion, Hayou et al. 2024, which also finds the best base rate a little below "
                          "LoRA's; halving is our rule, not tuned)"),
    "ia3": (3e-3, "3e-3: the (IA)^3 paper (T-Few, Liu et al. 2022)"),
    "prompt-tuning": (3e-2, "3e-2: PEFT's prompt-tuning guide for causal LMs (clm-prompt-tuning)"),
    "head-only": (1e-2, "1e-2: a convention for a fresh linear head on frozen features (10x LoRA's), not "
                        "from a paper"),
    "full": ({"text": 3e-5, "vision": 1e-4, "generation": 2e-5},
             "text 3e-5 (BERT paper's fine-tuning range 2e-5..5e-5), generation 2e-5 (the usual rate for "
             "full SFT of small LMs, e.g. Alpaca), vision 1e-4 (a common AdamW rate for fine-tuning ImageNet "
             "CNNs; no paper value)"),
}


def learning_rate(method: str, workload: str, recipe_lr: float) -> float:
    value = LEARNING_RATES[method][0]
    if isinstance(value, dict):
        value = value[workload]
    if value == "recipe":
        return recipe_lr
    if isinstance(value, tuple):
        return recipe_lr * value[1]
    return float(value)


def recipe_learning_rate(recipe: Path) -> float:
    import tomllib

    return float(tomllib.loads(recipe.read_text()).get("train", {}).get("learning_rate", 1e-4))


def command(recipe: Path, method: str, workload: str, out_dir: Path, *, epochs: int | None,
            limit: int | None, extra: list[str]) -> list[str]:
    sets = [*METHODS[method][0], f"train.learning_rate={learning_rate(method, workload, recipe_learning_rate(recipe))}"]
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if limit is not None:
        sets.append(f"data.limit={limit}")
    sets += [*extra, f'output.dir="{out_dir}"']
    cmd = [sys.executable, "-m", "finetune.cli", "run", str(recipe), "--overwrite", "-q"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def weights_bytes(adapter: Path) -> int:
    """Bytes of the weight files the run saved (not the tokenizer, configs or cards)."""
    if not adapter.is_dir():
        return 0
    return sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def collect(run_dir: Path, *, workload: str, method: str, wall_s: float | None = None,
            peak_mib: int | None = None, lr: float | None = None) -> dict:
    """One table row from a finished run folder."""
    m = json.loads((run_dir / "metrics.json").read_text())
    metric = m["selection_metric"]
    return {
        "workload": workload, "method": method, "learning_rate": lr,
        "metric": metric, "mode": m.get("selection_mode"), "value": m["best"][metric],
        "before": (m.get("before") or {}).get(metric), "best_step": m["best"].get("step"),
        "trainable": m["params"]["trainable"], "total": m["params"]["total"],
        "train_time_s": m["train"]["train_time_s"], "steps": m["train"]["steps"],
        "wall_s": None if wall_s is None else round(wall_s, 1), "peak_rss_mib": peak_mib,
        "adapter_bytes": weights_bytes(run_dir / "adapter"), "run": str(run_dir),
    }


def error_summary(text: str) -> str:
    """The finetune error (``error: ...`` and the line that says what is wrong), else the last line, for the table."""
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    for i, line in enumerate(lines):
        if line.lower().startswith("error"):
            return " ".join(lines[i:i + 2])[:300].replace("|", "/")
    return (lines[-1] if lines else "failed")[:300].replace("|", "/")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def tables(rows: list[dict]) -> str:
    """One markdown table per workload, in the order the rows came."""
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == workload]
        ok = [r for r in group if "error" not in r]
        metric = ok[0]["metric"] if ok else "metric"
        extra = any("correct" in r for r in ok)
        out.append(f"### {workload}\n")
        head = (f"| method | lr | {metric} (best) |" + (" correct (held-out) |" if extra else "")
                + " trainable params | % of total | train time | wall time | peak RSS | adapter weights |")
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for r in group:
            if "error" in r:
                out.append(f"| {r['method']} | {r.get('learning_rate', '')} | failed: {r['error']} |")
                continue
            cells = [r["method"], f"{r['learning_rate']:g}" if r.get("learning_rate") else "-",
                     f"{r['value']:.4f}"]
            if extra:
                cells.append(f"{r['correct']:.2f}" if "correct" in r else "-")
            cells += [f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.2f} %",
                      f"{r['train_time_s']:.1f} s", "-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s",
                      "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,} MiB",
                      human_bytes(r["adapter_bytes"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="text,vision,generation", help="comma-separated: text,vision,generation")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (each runs where it applies)")
    parser.add_argument("--epochs", type=int, help="override train.epochs (default: the recipe's)")
    parser.add_argument("--limit", type=int, help="data.limit: at most this many training rows (smoke runs)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override, every run")
    parser.add_argument("--recipe", action="append", default=[], metavar="WORKLOAD=PATH",
                        help="run a workload on another recipe (repeatable)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench-adapters")
    parser.add_argument("--correctness", action="store_true",
                        help="generation: also the share of correct answers on the 100 held-out prompts")
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown) and FILE.json (rows)")
    args = parser.parse_args(argv)

    recipes = dict(WORKLOADS)
    for item in args.recipe:
        name, _, path = item.partition("=")
        if name not in WORKLOADS or not path:
            parser.error(f"--recipe {item!r}: expected WORKLOAD=PATH with WORKLOAD one of {', '.join(WORKLOADS)}")
        recipes[name] = Path(path).resolve()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")

    from common import timed

    rows = []
    for workload in workloads:
        recipe = recipes[workload]
        for method in methods:
            applies = METHODS[method][1]
            if applies is not None and workload not in applies:
                continue
            out_dir = args.runs_dir.resolve() / f"{workload}-{method.replace('+', 'plus')}"
            lr = learning_rate(method, workload, recipe_learning_rate(recipe))
            cmd = command(recipe, method, workload, out_dir, epochs=args.epochs, limit=args.limit, extra=args.extra)
            print(f"{workload} / {method} (lr {lr:g}) ...", flush=True)
            try:
                wall, peak, _ = timed(cmd, REPO)
            except SystemExit as err:  # timed's way of reporting a failed run: keep going, show it in the table
                rows.append({"workload": workload, "method": method, "learning_rate": lr,
                             "error": error_summary(str(err)), "command": cmd})
                print(f"  failed: {err}", flush=True)
                if args.out:
                    write(args, rows)
                continue
            row = collect(out_dir, workload=workload, method=method, wall_s=wall, peak_mib=peak, lr=lr)
            if args.correctness and workload == "generation":
                row.update(correctness(out_dir))
            row["command"] = cmd
            rows.append(row)
            print(f"  {row['metric']} {row['value']:.4f}, {row['trainable']:,} trainable, "
                  f"train {row['train_time_s']:.1f} s, wall {wall:.0f} s, peak {peak:,} MiB", flush=True)
            if args.out:  # after every run: an interrupted benchmark keeps what it measured
                write(args, rows)

    text = tables(rows)
    print()
    print(text)
    if args.out:
        write(args, rows)
    return 1 if any("error" in r for r in rows) else 0


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(tables(rows))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "epochs": args.epochs,
         "limit": args.limit, "learning_rates": {k: v[1] for k, v in LEARNING_RATES.items()}, "rows": rows},
        indent=2))


def correctness(run: Path) -> dict:
    """Share of correct / exact answers on the held-out arithmetic prompts, in a fresh process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c.json"
        subprocess.run([sys.executable, str(HERE / "arithmetic_correctness.py"), str(run), "--json", str(out)],
                       check=True, cwd=str(REPO), capture_output=True, text=True)
        result = json.loads(out.read_text())[0]
    return {"correct": result["correct"], "exact": result["exact"]}


if __name__ == "__main__":
    sys.exit(main())
