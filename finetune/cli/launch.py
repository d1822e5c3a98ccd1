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

    cmd = [sys.executable, "-m", "finetune.cli.launch", "--multi_gpu",
           "--num_processes", str(num_processes * num_machines), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--dynamo_backend", "no", "--mixed_precision", "no"]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip]
    if not main_process_port and num_machines == 1:
        # Accelerate's fixed default (29500) makes a second multi-process run on the same machine fail with
        # "address already in use"; on one machine any free port serves.
        main_process_port = free_port()
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Accelerate on CPU: without this every rank would train its own copy, unsynchronised.
        env["ACCELERATE_USE_CPU"] = "1"
    cmd += ["-m", "finetune.cli", *strip_launch_options(argv)]
    return subprocess.call(cmd, env=env)


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_main(argv: list[str]) -> int:
    """Accelerate's launcher (``accelerate launch ARGV``), run as this module: when a process fails, its own
    message is what the user reads (a finetune error is printed by the process as ``error: ...``), and the
    launcher exits with that process's exit code instead of adding torch's ChildFailedError traceback."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is reported below
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(f"finetune: process {failure.local_rank} of the launch stopped with exit code {failure.exitcode}; "
              "the others were stopped.", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(launcher_main(sys.argv[1:]))
