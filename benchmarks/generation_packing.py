"""Training throughput of causal-lm batching strategies: plain padding vs length-grouped batches vs packing.

Same examples, same model (real SmolLM2-135M-Instruct + LoRA r8 on q_proj/v_proj, fp32), one pass each,
through the plugin's own code path (build_dataset -> train_batches -> collate -> training_loss ->
backward -> AdamW step). Examples are chat conversations of 1-6 arithmetic turns (varied lengths, as
in real instruction data). Reports real (non-padding) tokens per second.

    .venv/bin/python benchmarks/generation_packing.py [--examples 48] [--batch-size 8] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "arithmetic_instructions.jsonl")
            .read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.sample(rows, rng.randint(1, 6))
        out.append({"messages": [m for t in turns for m in t["messages"]]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--backbone", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    args = parser.parse_args()

    import tomli_w
    import torch

    from finetune.run.session import build_model, open_session

    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(args.examples)))
    results = []
    for label, extra, grouped in (("padding (random batches)", {}, False), ("length-grouped batches", {}, True),
                                  ("packing", {"packing": True}, False)):
        recipe = tmp / "recipe.toml"
        recipe.write_text(tomli_w.dumps({
            "task": {"name": "causal-lm", "sample_prompts": 0},
            "model": {"backbone": args.backbone},
            "data": {"train": str(data), "eval": str(data), "max_length": args.max_length, **extra},
            "peft": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"batch_size": args.batch_size, "mixed_precision": "no", "seed": 0, "group_by_length": grouped},
            "output": {"dir": str(tmp / "run")}}))
        session = open_session(recipe)
        model, tok, _ = build_model(session)
        task = session.task
        ds = task.build_dataset(session.splits.train, tok, training=True)
        collate = task.collate_fn(tok)
        batches = task.train_batches(ds, args.batch_size, 0, 0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        real = padded = 0
        start = time.perf_counter()
        for indices in batches:
            batch = collate([ds[i] for i in indices])
            loss = task.training_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real += sum(len(ds[i]["input_ids"]) for i in indices)
            padded += batch["input_ids"].numel()
        seconds = time.perf_counter() - start
        results.append((label, len(ds), len(batches), real, padded, seconds))
        print(f"  {label}: {seconds:.1f}s", file=sys.stderr, flush=True)
        del model

    base = results[0][3] / results[0][5]
    print(f"\n{args.examples} conversations (1-6 turns), batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.backbone}, LoRA r8, fp32, torch threads {torch.get_num_threads()}\n")
    print("| strategy | rows | steps | real tokens | padding | time (s) | real tokens/s | vs padding |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rows, steps, real, padded, seconds in results:
        rate = real / seconds
        print(f"| {label} | {rows} | {steps} | {real} | {100 * (1 - real / padded):.0f}% | {seconds:.1f} | "
              f"{rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
