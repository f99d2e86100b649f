"""What the benchmark scripts share: the device, timing, the machine's description, and host memory figures.

Timing uses ``torch.utils.benchmark.Timer`` (it synchronises CUDA around each measurement); the machine line
starts from MONAI's ``get_system_info``. Host memory: the process's current RSS and a resettable peak RSS.
Linux gives both in ``/proc/self/status`` (``VmRSS``, ``VmHWM``), and writing 5 to ``/proc/self/clear_refs``
sets the peak back to the current RSS, so each phase or row can report its own peak. Without procfs only
``ru_maxrss`` is left: the peak since the process started, which cannot be reset.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when there is one), ``cpu`` or ``cuda[:N]``; anything else is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available.")
    return device


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones, each a
    ``torch.utils.benchmark.Timer`` measurement (CUDA synchronised before and after)."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn})
    for _ in range(warmup):
        fn()
    return [timer.timeit(1).times[0] for _ in range(reps)]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one call of ``fn`` (the device synchronised before and after) and its result, for
    phases that return what the next phase needs."""
    import time

    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def describe_machine(device: torch.device) -> list[str]:
    """Header lines: host (MONAI's system info, the CPU model, usable cores, load), device, software."""
    import monai
    from monai.config.deviceconfig import get_system_info

    info = get_system_info()
    cpu = info.get("Processor") or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    lines = [
        f"host     : {platform.node()} | {info.get('Platform', platform.platform())} | CPU {cpu}, "
        f"{os.cpu_count()} logical CPUs ({usable} usable), torch threads {torch.get_num_threads()}{load}"
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"device   : {device} = {props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark {torch.backends.cudnn.benchmark}, "
            f"fp32 matmul precision {torch.get_float32_matmul_precision()}"
        )
    else:
        lines.append(f"device   : cpu ({cpu})")
    lines.append(f"software : torch {torch.__version__}, MONAI {monai.__version__}, Python {platform.python_version()}")
    return lines


def status_kib(name: str) -> int | None:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of ``/proc/self/status``; ``None`` where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mib() -> float | None:
    """The process's resident set size now, or ``None`` without procfs."""
    kib = status_kib("VmRSS")
    return None if kib is None else kib / 1024


class HostPeak:
    """Peak resident set size of this process, reset by :meth:`reset` where Linux allows it.

    ``how`` says which figure :meth:`peak_mib` gives, for the benchmark's header.
    """

    def __init__(self) -> None:
        self.resettable = self._clear()
        if self.resettable:
            self.how = "VmHWM of /proc/self/status, reset by /proc/self/clear_refs"
        elif status_kib("VmHWM") is not None:
            self.how = "VmHWM of /proc/self/status (not resettable here: peak since the process started)"
        else:
            self.how = "ru_maxrss of getrusage (peak since the process started, not resettable)"

    @staticmethod
    def _clear() -> bool:
        """Set the peak back to the current RSS; True when that worked."""
        if status_kib("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + 4096  # the peak now equals the current RSS

    def reset(self) -> None:
        gc.collect()
        if self.resettable:
            self._clear()

    def peak_mib(self) -> float:
        hwm = status_kib("VmHWM")
        if hwm is not None:
            return hwm / 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux

    def current_mib(self) -> float:
        """The current RSS, or without procfs the best figure there is: the peak."""
        rss = current_rss_mib()
        return self.peak_mib() if rss is None else rss
