"""What the benchmark scripts share: timing a process with its peak memory, and the machine's matmul peak."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall time, peak RSS (MiB, sampled every 50 ms) and stdout of one process."""
    import threading

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True)))
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak[0] // 2**20, out


def peak_matmul_gflops() -> dict[str, float]:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        for _ in range(2):
            a @ b
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        out[name] = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t) / 1e9
    return out
