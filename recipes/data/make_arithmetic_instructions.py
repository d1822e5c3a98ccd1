"""Build arithmetic_instructions.jsonl: short arithmetic and unit-conversion instructions (chat `messages`).

Every answer uses one fixed format ("17 + 25 = 42", "3.5 km = 3500 m"), so the effect of fine-tuning is
easy to see: an instruction-tuned base model answers in prose, the fine-tuned one in the format.
Generated with a fixed seed; no external data (public domain / CC0).

    python recipes/data/make_arithmetic_instructions.py   # rewrites the .jsonl next to this script
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_ROWS = 320
UNITS = [  # (from, to, factor, plural names for the question)
    ("km", "m", 1000, "kilometres", "metres"), ("m", "cm", 100, "metres", "centimetres"),
    ("kg", "g", 1000, "kilograms", "grams"), ("h", "min", 60, "hours", "minutes"),
    ("min", "s", 60, "minutes", "seconds"), ("L", "mL", 1000, "litres", "millilitres"),
    ("cm", "mm", 10, "centimetres", "millimetres"), ("day", "h", 24, "days", "hours"),
]
ARITH = [("+", "plus", lambda a, b: a + b), ("-", "minus", lambda a, b: a - b), ("*", "times", lambda a, b: a * b)]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def make_row(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        sym, word, fn = rng.choice(ARITH)
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if sym != "*" else (rng.randint(2, 30), rng.randint(2, 12))
        question = rng.choice([f"What is {a} {sym} {b}?", f"Compute {a} {word} {b}.", f"Calculate {a} {sym} {b}.",
                               f"How much is {a} {word} {b}?"])
        answer = f"{a} {sym} {b} = {fn(a, b)}"
    else:
        src, dst, factor, src_name, dst_name = rng.choice(UNITS)
        value = rng.choice([rng.randint(1, 20), rng.randint(1, 40) / 2, rng.randint(1, 90) / 10])
        if value == 1:
            src_name = src_name[:-1]  # "1 kilogram", not "1 kilograms"
        question = rng.choice([f"Convert {_num(value)} {src} to {dst}.", f"How many {dst_name} are in "
                               f"{_num(value)} {src_name}?", f"Express {_num(value)} {src} in {dst}."])
        answer = f"{_num(value)} {src} = {_num(round(value * factor, 6))} {dst}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < N_ROWS:
        row = make_row(rng)
        key = row["messages"][0]["content"]
        if key not in seen:  # no question twice (a held-out question is never a training question)
            seen.add(key)
            rows.append(row)
    out = Path(__file__).with_name("arithmetic_instructions.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
