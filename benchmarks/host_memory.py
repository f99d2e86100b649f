"""Host memory figures shared by the benchmark scripts: the process's current RSS and a resettable peak RSS.

Linux gives both in ``/proc/self/status`` (``VmRSS``, ``VmHWM``), and writing 5 to ``/proc/self/clear_refs``
sets the peak back to the current RSS, so each phase or row can report its own peak. Without procfs only
``ru_maxrss`` is left: the peak since the process started, which cannot be reset.
"""

from __future__ import annotations

import gc
import resource
import sys


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
