"""Build unit_conversion_prompts.jsonl: the unit-conversion rows of arithmetic_prompts.jsonl (easier GRPO
training prompts: one fixed factor per unit pair, which a 135M model can learn from a reward; two-digit
arithmetic it mostly cannot). Only training prompts are filtered: the held-out file is untouched, and
none of its questions is in arithmetic_prompts.jsonl.

    python recipes/data/make_unit_prompts.py   # rewrites unit_conversion_prompts.jsonl next to this script
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
ARITHMETIC = re.compile(r"^-?\d+ [-+*] -?\d+ = ")


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "arithmetic_prompts.jsonl").read_text().splitlines() if line.strip()]
    units = [r for r in rows if not ARITHMETIC.match(r["messages"][-1]["content"])]
    (HERE / "unit_conversion_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in units))
    print(f"wrote {len(units)} of {len(rows)} rows to {HERE / 'unit_conversion_prompts.jsonl'}")


if __name__ == "__main__":
    main()
