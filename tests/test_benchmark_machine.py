"""The benchmarks' machine line names the CPU kernels torch runs: they change results, not only speed."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_machine_line_names_the_cpu_kernels_and_a_onednn_cap(monkeypatch):
    # The MoMA benchmark's teacher scores 0.799 with oneDNN's AVX-512 kernels and 0.853 capped at AVX2
    # (docs/benchmarks/moma.md): a page measured on another host must say which kernels it ran.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.common import machine_description

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert f", {torch.backends.cpu.get_cpu_capability()} kernels," in machine_description()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "(oneDNN capped at AVX2) kernels," in machine_description()
