"""What train.mixed_precision = "auto" picks on a CPU, from its flags (faked /proc/cpuinfo)."""

from __future__ import annotations

import pytest
import torch

from finetune.engine.precision import resolve_mixed_precision

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule applies only without a GPU")


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", "bf16"),  # AMX: bf16 matrix units
    ("fpu sse avx512f avx512_bf16", "no"),  # AVX512-BF16 alone measured 1.5x slower than fp32 (training)
    ("fpu sse avx2", "no"),
])
def test_auto_picks_bf16_only_on_cpus_with_amx(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert resolve_mixed_precision("auto", cpuinfo) == expected


def test_an_explicit_setting_is_kept_and_an_unreadable_cpuinfo_means_fp32(tmp_path):
    assert resolve_mixed_precision("bf16", tmp_path / "missing") == "bf16"
    assert resolve_mixed_precision("auto", tmp_path / "missing") == "no"
