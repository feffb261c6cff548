"""Honest timing and provenance for benchmarks: side-by-side interleaved runs, synchronised clocks, medians, and
the hardware/software/command record every results file carries.

The original research code timed CUDA with `time.time()` and no synchronisation; here every CUDA measurement uses
CUDA events and every CPU measurement `time.perf_counter`, alternating the variants within each repetition so that
machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _time_once(function: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, with the device's work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def time_side_by_side(
    variants: dict[str, Callable[[], object]],
    repeats: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Time several variants of the same work, interleaved, after warm-up runs that are not recorded.

    Args:
        variants (`dict[str, Callable]`): name -> zero-argument function.
        repeats (`int`, defaults to 15): recorded runs per variant.
        warmup (`int`, defaults to 3): unrecorded runs per variant first.
        device (`torch.device` or `str`): where the work runs (CUDA timing uses events).

    Returns:
        `dict[str, list[float]]`: seconds of every recorded run per variant.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for function in variants.values():
            _time_once(function, device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            times[name].append(_time_once(function, device))
    return times


class _OperatorCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(function: Callable[[], object]) -> int:
    """ATen operators `function()` dispatches: on a GPU each is a kernel launch or host-side work, so when a forward
    is bound by dispatch rather than arithmetic (small models, short sequences) its time follows this count."""
    with _OperatorCounter() as counter:
        function()
    return counter.count


_SYNCHRONISING_OPERATORS = frozenset(
    {
        torch.ops.aten.nonzero.default,  # its output shape is data
        torch.ops.aten.equal.default,
        torch.ops.aten.is_nonzero.default,  # bool(tensor)
        torch.ops.aten._local_scalar_dense.default,  # tensor.item(), int(tensor), float(tensor)
    }
)


class _HostSyncCounter(TorchDispatchMode):
    """Counts the operators that read device values on the host, and `Tensor.tolist`, which does so without one."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _SYNCHRONISING_OPERATORS
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist

        def counted(tensor: torch.Tensor):
            self.count += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def count_host_syncs(function: Callable[[], object]) -> int:
    """Times `function()` makes the host wait for values computed on the device (`nonzero`, `.tolist()`,
    `bool(tensor)`, ...). On a GPU each one drains the launch queue, so the device idles while the host queues the
    next kernels: the count that, with `count_operators`, decides a dispatch-bound forward's time."""
    with _HostSyncCounter() as counter:
        function()
    return counter.count


def add_device_arguments(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """`--device` (default: CUDA when available) and `--dtype`, the same in every benchmark script."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])


def median(values: list[float]) -> float:
    return statistics.median(values)


def environment(device: torch.device | str = "cpu") -> dict[str, object]:
    """Hardware, software versions, git revision, command and date, for a results file."""
    import transformers

    device = torch.device(device)
    record: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(argument) for argument in [Path(sys.executable).name, *sys.argv]),
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def atomic_write_json(path: Path, data: object) -> None:
    """Write a results file through a temporary sibling, so an interrupted run never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    temporary.replace(path)


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
