"""Start-up cost of the CLI: `finetune --help`, `finetune tasks` and `finetune validate` on the
text quickstart (recipe, plugins, backbone, data, model build and one collated batch).

    .venv/bin/python benchmarks/startup.py [--repeats 5]

Each command runs in a fresh process, so the times include Python start-up and imports.
Prints the median and the fastest of the repeats as a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    exe = shutil.which("finetune", path=str(Path(sys.executable).parent)) or "finetune"
    commands = {
        "finetune --help": [exe, "--help"],
        "finetune tasks": [exe, "tasks"],
        "finetune validate recipes/text-quickstart.toml": [exe, "validate", str(REPO / "recipes" /
                                                                                 "text-quickstart.toml")],
    }
    rows = []
    for name, cmd in commands.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            times.append(time.perf_counter() - start)
            if result.returncode:
                raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
        rows.append((name, statistics.median(times), min(times)))
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.repeats} runs each\n")
    print("| command | median s | fastest s |\n|---|---|---|")
    for name, median, fastest in rows:
        print(f"| `{name}` | {median:.2f} | {fastest:.2f} |")


if __name__ == "__main__":
    main()
