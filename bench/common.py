"""What the benchmarks share: where the project, the shared data and the peer are (and the
project's modules on the import path), a timer, and one line that describes the machine."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEER = SHARED / "bench" / "peer_seed.py"
sys.path.insert(0, str(ROOT))

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of one call, and what it returned."""
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def machine() -> str:
    """CPU model, cores, Python, and whether the CPU computes bf16 natively (which decides the
    default numerics path: bf16 autocast or fp32)."""
    import model

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    bf16 = "native bf16" if model.cpu_has_native_bf16() else "no native bf16"
    return f"{cpu}, {os.cpu_count()} cores, {bf16}, Python {platform.python_version()}"


def numerics_paths(device: str) -> dict[str, str]:
    """The --precision values to run for both numerics paths, each with the path's name: the
    default on `device` ("auto": "bfloat16" on a CPU with native bf16), and fp32 unless the
    default already is fp32."""
    import model

    default = model.precision_for(model.setup_device(device)[0]).describe().split(",")[0]
    return {"auto": default} if default == "fp32" else {"auto": default, "fp32": "fp32"}
