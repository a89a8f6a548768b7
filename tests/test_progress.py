"""Progress where people look: a bar on a terminal, timed plain lines with an estimate in a log file
(nohup, Slurm, CI), nothing with --quiet; for a real run written to a file, and the demo's fine-tune."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import SMALL_RUN
from qmerge.io.progress import INTERVAL_ENV, Progress, clock, showing, track

LINE = re.compile(r"\[qmerge\] (?P<desc>[\w -]+): (?P<done>\d+)/(?P<total>\d+) \w+ \(\d+%\), (?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:]+|unknown)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_with_an_estimate_off_a_terminal(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.05")
    log = io.StringIO()
    with Progress(4, "gptq", "layer", enabled=True, stream=log) as bar:
        for _ in range(4):
            time.sleep(0.12)
            bar.note("layer")
            bar.update()
    lines = log.getvalue().splitlines()
    progress = [LINE.match(line) for line in lines[:-1]]
    assert len(progress) >= 4 and all(progress), lines  # one at least every 0.05 s over ~0.5 s
    etas = [m["eta"] for m in progress if m["done"] != "0"]
    assert etas and all(re.fullmatch(r"\d+:\d\d", eta) for eta in etas), lines
    assert [int(m["done"]) for m in progress] == sorted(int(m["done"]) for m in progress)  # monotone
    assert re.fullmatch(r"\[qmerge\] gptq: 4/4 layers in 0:0\d", lines[-1]), lines[-1]
    assert "\r" not in log.getvalue()


def test_a_short_step_in_a_log_stays_silent(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "30")
    log = io.StringIO()
    assert list(track(range(5), "merge", "tensor", enabled=True, stream=log)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.01")
    tty = Terminal()
    list(track(range(3), "drift", "batch", enabled=True, stream=tty))
    assert "drift" in tty.getvalue() and "\r" in tty.getvalue() and "[qmerge]" not in tty.getvalue()  # tqdm's bar
    silent = io.StringIO()
    with showing(False):
        for _ in track(range(3), "drift", "batch", stream=silent):  # enabled=None: the context decides
            time.sleep(0.02)
    assert silent.getvalue() == ""
    shown = io.StringIO()
    with showing(True):
        for _ in track(range(3), "drift", "batch", stream=shown):
            time.sleep(0.03)
    assert "[qmerge] drift:" in shown.getvalue()


def test_clock():
    assert (clock(5), clock(65), clock(3725)) == ("0:05", "1:05", "1:02:05")


def test_demo_fine_tune_prints_its_progress(tiny_base, tmp_path, monkeypatch, capfd):
    """The demo's QLoRA fine-tune (a few steps of it, on the tiny model) reports each step with an
    estimate when stderr is not a terminal."""
    from qmerge import demo

    monkeypatch.setenv(INTERVAL_ENV, "0.01")
    monkeypatch.setitem(demo.TRAIN, "steps", 3)
    monkeypatch.setitem(demo.TRAIN, "seq_len", 32)
    capfd.readouterr()
    demo.train_adapter(tiny_base, tmp_path / "adapter", echo=True)
    err = capfd.readouterr().err
    lines = [m for m in map(LINE.match, err.splitlines()) if m and m["desc"] == "demo fine-tune"]
    assert lines and lines[-1]["total"] == "3" and any(m["eta"] != "unknown" for m in lines), err[-2000:]
    assert "[qmerge] demo fine-tune: 3/3 steps in" in err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_run_written_to_a_log_file_shows_gptq_and_drift_progress(tiny_base, tiny_adapter, tmp_path):
    """`qmerge run > log 2>&1`, as under nohup or Slurm: progress lines with an estimate for GPTQ
    (per layer) and the drift stage (per candidate and window), none of tqdm's carriage returns."""
    log = tmp_path / "run.log"
    args = ["run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--candidates", "merged,gptq", "--samples", "1",
            *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL_RUN.items())]
    env = {**os.environ, INTERVAL_ENV: "0.02"}
    with open(log, "w") as f:
        status = subprocess.run([sys.executable, "-m", "qmerge.cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900).returncode
    text = log.read_text()
    assert status == 0, text[-3000:]
    seen = {}
    for m in map(LINE.match, text.splitlines()):
        if m:
            seen.setdefault(m["desc"], []).append(m)
    batches = 5 * SMALL_RUN["eval_samples"]  # the reference once, merged, gptq and the noise floor, then all their token statistics, each over the eval windows
    for stage, total in (("gptq", "2"), ("drift", str(batches))):
        assert stage in seen and all(m["total"] == total for m in seen[stage]), (stage, text[-3000:])
        assert any(re.fullmatch(r"\d+:\d\d", m["eta"]) for m in seen[stage]), (stage, [m.group() for m in seen[stage]])
    assert "\r" not in text and "[qmerge] gptq: 2/2 layers in" in text and f"[qmerge] drift: {batches}/{batches} batches in" in text
