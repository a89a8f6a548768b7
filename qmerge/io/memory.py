"""Peak resident memory of one stage of a run.

The kernel's high-water mark (ru_maxrss) covers the whole process so far, so a stage after a heavy
one would report that one's peak; resetting the mark (/proc/self/clear_refs) would also change what
a parent process or /usr/bin/time reads for the whole run. Instead a thread samples this process's
resident set every 10 ms while the stage runs: it can miss a spike shorter than that, never invent
one. Where /proc is missing (macOS), the process high-water mark is all there is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_mb() -> float | None:
    """This process's resident set now, or None without /proc."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def release() -> None:
    """Hand memory freed by a finished step back to the system: collect cycles, then ask glibc to trim
    its heaps. Freed tensors below glibc's mmap threshold (which it raises up to 32 MB as large blocks
    are freed) stay in the heap as free space the next step cannot always reuse; trimming after the
    merge stage gave back ~300 MB of SmolLM2's run. A no-op without glibc."""
    gc.collect()
    trim()


def trim() -> None:
    """release() without the cycle collection, for inside loops: tensors freed by reference counting
    (a batch's activations, a layer's temporaries) are handed back at once, without gc.collect's
    walk over every object (~0.1–1 s in a process holding a model: 7% of a profiled run)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def high_water_mb() -> float:
    """The process's peak resident set since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """`with PeakRSS() as peak: ...`, then `peak.mb`: the largest resident set seen inside."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            now = current_mb()
            if now is None:
                return
            self.mb = max(self.mb, now)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = current_mb()
        self.mb = round(max(self.mb, now) if now is not None else high_water_mb(), 1)


LIBRARY_PAGES = 150 * 2**20  # library code a forked stage worker faults in (torch kernels, bitsandbytes, PEFT): measured 120–260 MB


def baseline_bytes(forked_workers: bool) -> int:
    """What a stage's process holds before the stage allocates anything: this process's resident set
    for a stage run here; for a forked worker, this process's anonymous memory (shared with it) and the
    library pages a stage touches (a fork does not map the parent's file pages until used)."""
    status = _status()
    if forked_workers and "RssAnon" in status:
        return status["RssAnon"] + LIBRARY_PAGES
    return int((current_mb() or high_water_mb()) * 2**20)


def available_bytes(device: str) -> int:
    """Memory a run may use on `device`: on a GPU its free memory; on the host what the kernel reports
    available plus what this process already holds, capped by a cgroup (container) limit."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    meminfo = _meminfo()
    own = int((current_mb() or 0) * 2**20)
    available = meminfo.get("MemAvailable", meminfo.get("MemTotal", 0)) + own
    limit = _cgroup_limit()
    return min(available, limit) if limit else available


def _status() -> dict[str, int]:
    return _kib_table(Path("/proc/self/status"))


def _meminfo() -> dict[str, int]:
    return _kib_table(Path("/proc/meminfo"))


def _kib_table(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v1 memory.limit_in_bytes,
    or v2 memory.max), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            roots, name = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")], "memory.max"
        elif "memory" in controllers.split(","):
            roots, name = [Path("/sys/fs/cgroup/memory")], "memory.limit_in_bytes"
        else:
            continue
        parts = Path(path.lstrip("/")).parts
        for root in roots:
            for depth in range(len(parts), -1, -1):
                value = _read(root.joinpath(*parts[:depth], name))
                if value is not None and value.isdigit() and int(value) < 1 << 60:
                    limits.append(int(value))
    return min(limits) if limits else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
