"""Running a run's declared stages: each is reused when its manifest verifies (with --resume) or
built and committed whole, in this process or in a fresh worker process of its own (io.isolated),
with its wall time and peak memory recorded."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qmerge.io import isolated
from qmerge.io.manifests import StageCommitter, key_of
from qmerge.io.memory import PeakRSS


@dataclass(frozen=True)
class Stage:
    """One step of a run. Its output, DIR/name, is a function of `parts` (the inputs and settings it
    reads) and of the keys of the stages it reads (`after`), which together make its key."""

    name: str
    parts: dict
    build: Callable[[Path], dict]  # writes the stage's files into a directory; returns what the report keeps of it
    after: tuple[str, ...] = ()



@dataclass
class StageRunner:
    """Reuses (with --resume, when the manifest verifies) or builds each stage in turn, in this
    process or (workers: "fork" or "spawn") in a fresh worker process each, recording its wall time
    and peak memory."""

    out: Path
    resume: bool
    echo: bool
    job: Callable[[str], Callable[[Path], tuple[dict, dict]]]  # the build of the named stage: (report info, measurements)
    workers: str | None = None
    verify: bool = False  # --verify-inputs: hash a reused stage's files again
    keys: dict[str, str] = field(default_factory=dict)
    infos: dict[str, dict] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)

    def run(self, stage: Stage) -> None:
        committer = StageCommitter(self.out)
        parts = {**stage.parts, **{f"{up}_stage": self.keys[up] for up in stage.after}}
        key = key_of(**parts)
        info = committer.reusable(stage.name, key, self.verify) if self.resume else None
        if info is not None:
            self.records[stage.name] = {"reused": True}
            self._say(f"{stage.name}: reused (manifest verified)")
        else:
            info = {}
            self._say(f"{stage.name} ...")
            start = time.perf_counter()
            with committer.commit(stage.name, parts, info) as tmp:
                built, record = self._build(self.job(stage.name), tmp)
                info.update(built)
            self.records[stage.name] = {"wall_s": round(time.perf_counter() - start, 3), **record}
        self.keys[stage.name], self.infos[stage.name] = key, info

    def _build(self, job: Callable[[Path], tuple[dict, dict]], tmp: Path) -> tuple[dict, dict]:
        if self.workers is not None:
            (info, measured), peak = isolated.run(functools.partial(job, tmp), self.workers)
            return info, {"peak_rss_mb": peak, **measured, "worker": self.workers}
        with PeakRSS() as peak:
            info, measured = job(tmp)
        return info, {"peak_rss_mb": peak.mb, **measured}

    def _say(self, line: str) -> None:
        if self.echo:
            print(f"[qmerge] {line}", flush=True)


def worker_method(workers: str | None, device) -> str | None:
    """How stage workers start: fork where it is safe (CPU, a parent that computed single-threaded),
    spawn otherwise (a forked child cannot use CUDA)."""
    if workers is None:
        return None
    return "fork" if device.type == "cpu" and isolated.can_fork() else "spawn"
