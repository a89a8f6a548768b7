"""Token windows: BOS-led when the tokenizer adds BOS (llama.cpp's perplexity rule), plain text
tokens otherwise, for calibration, eval and verify alike; the report says which."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_tokenizer
from qmerge.io import text
from qmerge.io.corpus import stdlib_part
from qmerge.settings import DataSettings, RunSettings


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[bool, object]:
    out = {}
    for add_bos in (True, False):
        directory = tmp_path_factory.mktemp(f"tok-bos-{add_bos}")
        make_tokenizer(directory, 512, add_bos)
        out[add_bos] = AutoTokenizer.from_pretrained(directory)
    return out


@pytest.mark.parametrize("add_bos", [True, False])
def test_windows_start_with_bos_exactly_when_the_tokenizer_adds_it(tokenizers, add_bos):
    tokenizer = tokenizers[add_bos]
    docs = stdlib_part("eval")
    stream = tokenizer("\n\n".join(docs), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = text.token_windows(docs, tokenizer, 32, 5, "eval")
    assert windows.shape == (5, 32)
    if add_bos:
        bos = tokenizer.bos_token_id
        assert text.bos_of(tokenizer) == bos and tokenizer("x")["input_ids"][0] == bos
        assert (windows[:, 0] == bos).all()
        assert torch.equal(windows[:, 1:].reshape(-1), stream[: 5 * 31])  # the text continues across windows, 31 tokens each
    else:
        assert text.bos_of(tokenizer) is None
        assert torch.equal(windows.reshape(-1), stream[: 5 * 32])  # unchanged: seq_len text tokens each


def test_run_windows_and_report_say_bos(tiny_adapter, tmp_path):
    """prepare() cuts calibration and eval windows (verify takes the first eval windows) BOS-led for a
    base whose tokenizer adds BOS, and the report's inputs say so."""
    from conftest import make_base
    from qmerge.prepare import inputs_record, prepare

    base = make_base(tmp_path / "base", add_bos=True)
    settings = RunSettings(base=str(base), adapter=str(tiny_adapter), out=tmp_path / "out", skip_gptq=True,
                           data=DataSettings(calibration_samples=4, eval_samples=3, seq_len=32))
    p = prepare(settings)
    bos = AutoTokenizer.from_pretrained(base).bos_token_id
    assert p.bos and (p.calibration[:, 0] == bos).all() and (p.evaluations[0].windows[:, 0] == bos).all()
    assert inputs_record(settings, p)["windows_start_with_bos"] is True


def test_shared_run_reports_no_bos(tiny_run):
    """The tiny tokenizer adds no BOS: windows are text tokens only, and the report says so."""
    assert tiny_run.report["inputs"]["windows_start_with_bos"] is False
