"""A heavy step in a process of its own, so that it starts on a clean heap and everything it leaves
behind (glibc's fragmented arenas, GPTQModel's worker threads and module-level state, CUDA caches)
ends with it: a run's peak is then its largest step's, whatever ran before.

Two ways to start the process. "fork" (CPU runs): the child shares the parent's imported libraries
and prepared inputs copy-on-write, so it starts in milliseconds; libgomp (torch's OpenMP) cannot
survive a fork once its thread pool exists, so the parent must have computed with one thread only
(`single_threaded_parent`) and the child restores the thread count. The parent's objects are frozen
out of the garbage collector's reach for the fork (gc.freeze): a collection in the child would
otherwise write to every tracked object's header and so copy the pages holding them (measured: one
gc.collect() in a child of a parent that imported torch, transformers and GPTQModel made 137 MB of
those pages its own; frozen, 0.7 MB). "spawn" (GPU runs, where a
forked child cannot use CUDA): a fresh interpreter, the step pickled to it.

The child dies with its parent (PR_SET_PDEATHSIG), so a killed run leaves no orphan writing into a
stage directory. Its result, or its exception, comes back through a pipe.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from qmerge.io.memory import PeakRSS

_THREADS: int | None = None  # the thread count the parent gave up for single_threaded_parent


def single_threaded_parent() -> None:
    """Make this process fork-safe for torch: compute with one thread from now on (call it before any
    torch computation); forked steps get the thread count back."""
    global _THREADS
    import torch

    if _THREADS is None:
        _THREADS = torch.get_num_threads()
        torch.set_num_threads(1)


def can_fork() -> bool:
    return _THREADS is not None


def run(step: Callable[[], Any], method: str) -> tuple[Any, float]:
    """step() in a child process started by `method` ("fork" or "spawn"); returns its result and the
    child's peak resident set in MB. An exception in the child is raised here."""
    ctx = multiprocessing.get_context(method)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(step, send, _THREADS), daemon=False)
    if method == "fork":
        gc.freeze()
    try:
        child.start()
    finally:
        gc.unfreeze()  # the child keeps its copy frozen; the parent collects as before
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"a qmerge worker process died (exit status {child.exitcode}); rerun with --resume") from None
    except BaseException:
        child.terminate()
        child.join()
        raise
    child.join()
    kind, value, peak = outcome
    if kind == "error":
        raise value
    return value, peak


def _child(step: Callable[[], Any], send, threads: int | None) -> None:
    _die_with_parent()
    _fresh_console_writer()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the parent's tokenizer threads are not ours
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    peak = PeakRSS()
    try:
        with peak:
            value = step()
        send.send(("ok", value, peak.mb))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent to be raised there
        send.send(("error", _picklable(e), peak.mb))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _fresh_console_writer() -> None:
    """GPTQModel's console library (logbar) sends stdout through a writer thread that the parent
    started when it imported GPTQModel, and hands that writer out again from a cache; a forked child
    has no such thread, so its first flush (GPTQModel.load's spinner) waited forever. The cache is
    emptied so the child's first write starts a writer of its own."""
    buffer = sys.modules.get("logbar.buffer")
    if buffer is not None:
        buffer._CACHED_WRAPPERS.clear()


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception type pickle cannot rebuild
        return RuntimeError(f"{type(e).__name__}: {e}")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
