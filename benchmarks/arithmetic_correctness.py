"""Share of exactly correct answers on held-out arithmetic / unit-conversion prompts, per run.

Measures each stage of the generation quickstarts on the same 100 held-out prompts
(``recipes/data/arithmetic_heldout.jsonl``, never trained on by any stage): the SFT run
(``generation-quickstart``), then DPO and GRPO continued from it. Greedy answers (temperature 0), through
``finetune.load_run`` and the task's own ``predict``, as ``finetune predict`` gives them.

An answer is *correct* when its final number (after the last ``=``, else the last number in the text)
equals the reference's final number; *exact* when the whole answer equals the reference text
(``"42 - 75 = -33"``: format and number). The GRPO task's ``exact-number`` reward uses the same rule.

With two or more runs, each later run is also compared with the first prompt by prompt (paired): how many
prompts the first run got wrong and this one right (``gained``) and the reverse (``lost``), with the exact
two-sided sign-test (McNemar) p-value of that split: the chance of a split at least this uneven if either
run were as likely to win each discordant prompt.

    python benchmarks/arithmetic_correctness.py runs/generation-quickstart runs/grpo-quickstart
"""

from __future__ import annotations

import argparse
import json
import math
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
            "seconds": round(time.perf_counter() - t0, 1), "correct_each": [c for c, _ in scored],
            "examples": [{"prompt": r["prompt"], "answer": o["pred_text"]} for r, o in zip(records[:3], out[:3])]}


def sign_test(gained: int, lost: int) -> float:
    """Exact two-sided sign-test p-value of ``gained`` vs ``lost`` discordant pairs (McNemar's exact test)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(first: dict, other: dict) -> dict:
    """``other`` against ``first`` on the same prompts: gained / lost prompts and the sign-test p-value."""
    pairs = list(zip(first["correct_each"], other["correct_each"]))
    gained = sum(1 for a, b in pairs if not a and b)
    lost = sum(1 for a, b in pairs if a and not b)
    return {"gained": gained, "lost": lost, "p_value": round(sign_test(gained, lost), 4)}


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
    for r in results[1:]:
        r["vs_first"] = paired(results[0], r)
        v = r["vs_first"]
        print(f"{r['run']} vs {results[0]['run']}: gained {v['gained']} prompts, lost {v['lost']} "
              f"(sign test p = {v['p_value']:.3g})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
