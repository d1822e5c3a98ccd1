"""Share of exactly correct answers on held-out arithmetic / unit-conversion prompts, per run.

Measures each stage of the generation quickstarts on the same 100 held-out prompts
(``recipes/data/arithmetic_heldout.jsonl``, never trained on by any stage): the SFT run
(``generation-quickstart``), then DPO and GRPO continued from it. Greedy answers (temperature 0), through
``finetune.load_run`` and the task's own ``predict``, as ``finetune predict`` gives them.

An answer is *correct* when its final number (after the last ``=``, else the last number in the text)
equals the reference's final number; *exact* when the whole answer equals the reference text
(``"42 - 75 = -33"``: format and number). The GRPO task's ``exact-number`` reward uses the same rule.

    python benchmarks/arithmetic_correctness.py runs/generation-quickstart runs/grpo-quickstart
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from finetune_generation.rewards import final_number  # the exact-number reward's rule

HERE = Path(__file__).resolve().parent


def score(answer: str, reference: str) -> tuple[bool, bool]:
    """``(correct, exact)`` for one answer."""
    want, got = final_number(reference), final_number(answer)
    correct = want is not None and got is not None and abs(want - got) < 1e-6
    return correct, " ".join(answer.split()) == " ".join(reference.split())


def measure(run: Path, rows: list[dict]) -> dict:
    import torch

    from finetune import load_run

    t0 = time.perf_counter()
    task, model, processor = load_run(run, ["task.temperature=0"])[:3]
    records = [{"prompt": r["messages"][0]["content"]} for r in rows]
    with torch.no_grad():
        out = task.predict(model, processor, records, batch_size=25)
    scored = [score(o["pred_text"], r["messages"][-1]["content"]) for o, r in zip(out, rows)]
    return {"run": str(run), "correct": sum(c for c, _ in scored) / len(rows),
            "exact": sum(e for _, e in scored) / len(rows), "prompts": len(rows),
            "seconds": round(time.perf_counter() - t0, 1),
            "examples": [{"prompt": r["prompt"], "answer": o["pred_text"]} for r, o in zip(records[:3], out[:3])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders to measure")
    parser.add_argument("--input", type=Path, default=HERE.parent / "recipes/data/arithmetic_heldout.jsonl")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
    results = [measure(run, rows) for run in args.runs]
    print("| run | correct number | exact answer | prompts | seconds |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['correct']:.2f} | {r['exact']:.2f} | {r['prompts']} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
