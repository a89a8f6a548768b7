"""--group-size auto: the largest of 128, 64, 32 dividing every in_features of the layers GPTQ
quantizes, decided before any work; an explicit group size keeps its refusal."""

from __future__ import annotations

import pytest

from conftest import one_line_error
from qmerge.errors import QmergeError
from qmerge.quant.servers import resolve_group_size
from qmerge.settings import GPTQSettings


def shapes(*in_features: int) -> dict[str, tuple[int, int]]:
    return {f"layer{i}": (64, n) for i, n in enumerate(in_features)}


@pytest.mark.parametrize("in_features, chosen", [((4096, 11008), 128), ((576, 1536), 64), ((96, 192), 32)])
def test_auto_takes_the_largest_that_divides(in_features, chosen):
    gptq, note = resolve_group_size(shapes(*in_features), GPTQSettings())
    assert gptq.group_size == chosen and f"group size auto → {chosen}" in note
    assert gptq.bits == 4 and gptq.sym  # nothing else changed


def test_auto_refuses_when_none_divides():
    with pytest.raises(QmergeError, match="none of 128, 64, 32 divides in_features 80.*--group-size -1"):
        resolve_group_size(shapes(4096, 80), GPTQSettings())


def test_explicit_group_size_is_kept_or_refused():
    assert resolve_group_size(shapes(576), GPTQSettings(group_size=32)) == (GPTQSettings(group_size=32), None)
    with pytest.raises(QmergeError, match="--group-size 128 does not divide in_features 576.*use --group-size 64"):
        resolve_group_size(shapes(576, 1536), GPTQSettings(group_size=128))


def test_cli_group_size_values(tiny_base, tiny_adapter, tmp_path, cli):
    """An explicit 128 on the tiny model (in_features 64 and 128) is refused before any work; a word
    other than auto is refused by the parser."""
    out = tmp_path / "out"
    one_line_error(cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, "--group-size", "128"), 2, "--group-size 128", "use --group-size 64")
    assert not out.exists()
    with pytest.raises(SystemExit):
        cli("run", "--base", tiny_base, "--adapter", tiny_adapter, "--out", out, "--group-size", "big")
