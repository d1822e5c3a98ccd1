"""Multi-process training: `finetune run ... --num-processes N` relaunches itself through
Accelerate's launcher (so `accelerate launch -m finetune.cli run ...` and `torchrun -m
finetune.cli run ...` work the same way)."""

from __future__ import annotations

import os
import subprocess
import sys

_OWN_OPTIONS = ("--num-processes", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")


def strip_launch_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _OWN_OPTIONS:
            skip = True
            continue
        if any(arg.startswith(opt + "=") for opt in _OWN_OPTIONS):
            continue
        out.append(arg)
    return out


def launch(argv: list[str], *, num_processes: int, num_machines: int, machine_rank: int,
           main_process_ip: str | None, main_process_port: int | None) -> int:
    """Run ``finetune <argv>`` in ``num_processes`` processes; returns the exit code."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(num_processes * num_machines), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--dynamo_backend", "no", "--mixed_precision", "no"]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip]
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Accelerate on CPU: without this every rank would train its own copy, unsynchronised.
        env["ACCELERATE_USE_CPU"] = "1"
    cmd += ["-m", "finetune.cli", *strip_launch_options(argv)]
    return subprocess.call(cmd, env=env)
