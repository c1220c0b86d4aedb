"""engine/device.py: torch-free option checks, device/dtype resolution with one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rankwise.engine import device as dev
from rankwise.errors import RankwiseError


def test_checks_import_no_torch():
    code = ("import sys, rankwise.engine.device as d\n"
            "assert d.check_device(' CUDA:0 ') == 'cuda:0' and d.check_dtype('fp16') == 'float16'\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda:3"),
                                             (torch.device("cpu"), "cpu")])
def test_check_device_accepts(value, expected):
    assert dev.check_device(value) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "", None, 3])
def test_check_device_rejects_in_one_line(value):
    with pytest.raises(RankwiseError, match=r"^unknown device .*; use auto, cpu, cuda or cuda:N\.$"):
        dev.check_device(value)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("BF16", "bfloat16"), ("torch.float16", "float16"),
                                             ("half", "float16"), ("fp32", "float32"), ("float", "float32")])
def test_check_dtype_canonicalises(value, expected):
    assert dev.check_dtype(value) == expected


def test_check_dtype_passes_torch_dtypes_and_rejects_others():
    assert dev.check_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("int8", "float64", "", None, 16):
        with pytest.raises(RankwiseError, match="^unknown dtype"):
            dev.check_dtype(bad)


def test_resolve_dtype():
    assert dev.resolve_dtype("auto") is torch.float32
    assert dev.resolve_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert dev.resolve_dtype(None, torch.float16) is torch.float16
    assert dev.resolve_dtype("bf16") is torch.bfloat16 and dev.resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(RankwiseError, match=r"^unknown --dtype 'int4'"):
        dev.resolve_dtype("int4")
    with pytest.raises(RankwiseError, match="not a floating-point weight dtype"):
        dev.resolve_dtype(torch.int8)
    assert dev.DTYPES["fp16"] is torch.float16 and dev.DTYPES["auto"] is None
    assert dev.dtype_name(torch.bfloat16) == "bfloat16"


def test_config_dtype_reads_dtype_or_legacy_torch_dtype():
    assert dev.config_dtype(type("C", (), {"torch_dtype": "bfloat16"})()) is torch.bfloat16
    assert dev.config_dtype(type("C", (), {"dtype": torch.float16})()) is torch.float16
    assert dev.config_dtype(type("C", (), {"dtype": "int8"})()) is None
    assert dev.config_dtype(object()) is None


def test_resolve_device_cpu_and_errors(monkeypatch):
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert dev.stats_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RankwiseError, match=r"^unknown --device 'tpu'"):
        dev.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RankwiseError, match="asked for CUDA but this machine has cpu only"):
        dev.resolve_device("cuda:0")


def test_compute_dtype_upcasts_only_where_the_device_lacks_fast_kernels(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only x86 CPU
    assert not dev.fast_on(cpu, torch.bfloat16) and not dev.fast_on(cpu, torch.float16)
    assert dev.compute_dtype(cpu, torch.bfloat16) is torch.float32
    assert dev.compute_dtype(cpu, torch.float16, None) is torch.float32
    assert dev.compute_dtype(cpu, torch.float32) is torch.float32
    assert dev.compute_dtype(cpu, torch.float64) is torch.float64
    assert dev.compute_dtype(cpu, torch.bfloat16, "bf16") is torch.bfloat16  # an explicit choice wins
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert dev.compute_dtype(cpu, torch.bfloat16) is torch.bfloat16 and dev.compute_dtype(cpu, torch.float16) is \
        torch.float32
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"amx_bf16", "amx_fp16"}))
    assert dev.compute_dtype(cpu, torch.float16) is torch.float16
    for bad in ("int8", "float64", 3):
        with pytest.raises(RankwiseError, match=r"^unknown compute dtype .*; use one of auto, bfloat16"):
            dev.compute_dtype(cpu, torch.bfloat16, bad)
    with pytest.raises(RankwiseError, match="^unknown compute dtype"):
        __import__("rankwise").CompressConfig(compute_dtype="half-ish")


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = dev._cpu_flags()
    if __import__("platform").machine() == "x86_64" and __import__("os").path.exists("/proc/cpuinfo"):
        assert "sse2" in flags  # every x86-64 CPU has it
        has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
        assert dev.fast_on(torch.device("cpu"), torch.bfloat16) is has_bf16
