"""Build the prompt sets for the stages after supervised fine-tuning (DPO, GRPO) of the generation quickstart.

* ``arithmetic_prompts.jsonl``: 256 training prompts for preference tuning and GRPO;
* ``arithmetic_heldout.jsonl``: 100 held-out prompts on which every stage (SFT, DPO, GRPO) is measured;
* ``arithmetic_prompts_more.jsonl``: 2,000 more training prompts for longer GRPO runs (drawn after the two
  files above from the same seeded generator, so those two are unchanged).

Same generator and answer format as ``arithmetic_instructions.jsonl`` (chat ``messages``; the assistant turn
is the reference answer, e.g. "42 - 75 = -33"), another seed, and no question of the SFT data or of the other
files repeated: a held-out question was never trained on by any stage. No external data (public domain / CC0).

    python recipes/data/make_arithmetic_prompts.py   # rewrites the three .jsonl files next to this script
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_arithmetic_instructions import make_row

HERE = Path(__file__).parent
SIZES = {"arithmetic_prompts.jsonl": 256, "arithmetic_heldout.jsonl": 100, "arithmetic_prompts_more.jsonl": 2000}


def main() -> None:
    seen = {json.loads(line)["messages"][0]["content"]
            for line in (HERE / "arithmetic_instructions.jsonl").read_text().splitlines() if line.strip()}
    rng = random.Random(1)
    for name, size in SIZES.items():
        rows = []
        while len(rows) < size:
            row = make_row(rng)
            key = row["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                rows.append(row)
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
