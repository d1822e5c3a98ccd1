"""Mixed precision: what ``train.mixed_precision = "auto"`` means on this machine."""

from __future__ import annotations

from pathlib import Path


def resolve_mixed_precision(setting: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'auto' -> bf16 on GPUs that support it (else fp16), bf16 on CPUs with AMX, else 'no'.

    Measured: on a CPU with AVX512-BF16 but no AMX, bf16 autocast trained the text quickstart 1.5x slower
    than fp32 (18.6-19.5 s vs 11.6-12.8 s an epoch, same accuracy; benchmarks/README.md), and sampled /
    trained GRPO 1.4-1.7x slower; without either, ~5x slower."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # is_bf16_available() says True on CPUs where bf16 is slower than fp32: read the flags.
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return "no"
    return "bf16" if "amx_bf16" in flags else "no"


#: Read the loss on the host after every micro-batch (None: only on CPU, where it costs nothing;
