"""Hub inputs without a network: a local cache laid out as huggingface_hub lays out its own (refs,
snapshots, the cached tree listing of each commit) and HF_HUB_OFFLINE=1. `--revision` and ID@REV
reach huggingface_hub's snapshot_download and are recorded; a download fetches what a load reads
(huggingface_hub itself checks the cached snapshot against the tree listing filtered by qmerge's
patterns); the model card's metadata follows the hub's spec; `run --push-to` uploads through the
same code as `qmerge push`."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

import qmerge
from conftest import SMALL_RUN, make_base, one_line_error
from qmerge import recipe
from qmerge.errors import QmergeError
from qmerge.io.inputs import hub_patterns, resolve, tree_sha256
from qmerge.prepare import inputs_record, prepare
from qmerge.report import card

MAIN, V2, ADAPTER = "a" * 40, "b" * 40, "c" * 40
# What a Mistral- or Meta-style repository holds besides the transformers checkpoint: a load never reads these
ELSEWHERE = ["consolidated.safetensors", "original/params.json", "original/consolidated.00.pth", "modeling_tiny.py", "README.md"]


def add_repo(cache: Path, repo: str, revisions: dict[str, tuple[str, Path]], listed: list[str] = ()) -> None:
    """models--ORG--NAME: per revision refs/NAME → commit, snapshots/COMMIT (the files a load reads,
    copied from a folder), and trees/COMMIT.json, the listing of everything the repository holds."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, (commit, source) in revisions.items():
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / name).write_text(commit)
        snapshot = root / "snapshots" / commit
        if not snapshot.exists():
            shutil.copytree(source, snapshot)
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        tree = {"format_version": 1, "files": {f: {"size": 1, "blob_id": f"{i:040x}"} for i, f in enumerate([*files, *listed])}}
        (root / "trees").mkdir(exist_ok=True)
        (root / "trees" / f"{commit}.json").write_text(json.dumps(tree))


@pytest.fixture
def hub(tiny_base, tiny_adapter, tmp_path, monkeypatch) -> Path:
    """qm/tiny (main; v2 another seed), qm/adapter (v1) in an offline hub cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    add_repo(cache, "qm/tiny", {"main": (MAIN, tiny_base), "v2": (V2, make_base(tmp_path / "v2", seed=5))}, ELSEWHERE)
    add_repo(cache, "qm/adapter", {"main": (ADAPTER, tiny_adapter), "v1": (ADAPTER, tiny_adapter)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patched where snapshot_download reads it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def snapshot(cache: Path, repo: str, commit: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def test_revision_reaches_the_download(hub):
    assert resolve("qm/tiny", "base") == snapshot(hub, "qm/tiny", MAIN)
    assert resolve("qm/tiny", "base", revision="v2") == resolve("qm/tiny@v2", "base") == resolve("qm/tiny", "base", revision=V2) == snapshot(hub, "qm/tiny", V2)
    with pytest.raises(QmergeError, match="cannot fetch base 'qm/tiny' at revision 'v9' from the hub"):
        resolve("qm/tiny", "base", revision="v9")
    with pytest.raises(QmergeError, match="pins revision 'v2' but --revision says 'main'"):
        resolve("qm/tiny@v2", "base", revision="main")


def test_downloads_fetch_what_the_load_reads(hub):
    """huggingface_hub checks a cached snapshot against the commit's listing filtered by the patterns
    asked for: the snapshot holds no consolidated.safetensors, original/ or *.py, and passes with
    qmerge's patterns; asking for every safetensors (the old patterns) finds it incomplete, and
    --trust-remote-code asks for the repository's code too."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    with pytest.raises(IncompleteSnapshotError, match="consolidated.safetensors"):
        snapshot_download("qm/tiny", allow_patterns=["*.json", "*.safetensors"])
    assert resolve("qm/tiny", "base") == snapshot(hub, "qm/tiny", MAIN)
    with pytest.raises(QmergeError, match="IncompleteSnapshotError"):
        resolve("qm/tiny", "base", trust_remote_code=True)  # modeling_tiny.py is wanted now, and not in the snapshot
    (snapshot(hub, "qm/tiny", MAIN) / "modeling_tiny.py").write_text("# the repository's own model code\n")
    assert resolve("qm/tiny", "base", trust_remote_code=True) == snapshot(hub, "qm/tiny", MAIN)
    allow, ignore = hub_patterns()
    assert "*.py" not in allow and "*.py" in hub_patterns(trust_remote_code=True)[0] and "consolidated*" in ignore


def test_revisions_are_recorded(hub, tmp_path, cli):
    settings = recipe.to_settings({"base": "qm/tiny", "revision": "v2", "adapter": "qm/adapter@v1", "out": str(tmp_path / "o"), "skip_gptq": True})
    record = inputs_record(settings, prepare(settings, data=False))
    assert {k: record["base"][k] for k in ("spec", "revision", "commit", "from_hub")} == {"spec": "qm/tiny", "revision": "v2", "commit": V2, "from_hub": True}
    assert {k: record["adapter"][k] for k in ("spec", "revision", "commit")} == {"spec": "qm/adapter@v1", "revision": "v1", "commit": ADAPTER}
    assert record["base"]["sha256"] == tree_sha256(snapshot(hub, "qm/tiny", V2)) != tree_sha256(snapshot(hub, "qm/tiny", MAIN))
    # the CLI's merge reads the pinned base: its manifest holds that snapshot's hash
    assert cli("merge", "--base", "qm/tiny", "--revision", "v2", "--adapter", "qm/adapter@v1", "--out", tmp_path / "m", "--no-verify", "--quiet").returncode == 0
    produced = json.loads((tmp_path / "m" / "manifests" / "merged.json").read_text())["produced_by"]
    assert produced["base"] == record["base"]["sha256"] and produced["adapter"] == record["adapter"]["sha256"]
    one_line_error(cli("merge", "--base", "qm/tiny", "--revision", "nope", "--adapter", "qm/adapter", "--out", tmp_path / "x"), 2, "revision 'nope'")


def test_model_card_metadata_for_a_quantized_fine_tune(tiny_run):
    """As the hub's model-card spec asks of a quantization: base_model the base's hub id, the relation
    set to `quantized`, the library and task; the adapter named (and linked) in the text."""
    rep = copy.deepcopy(tiny_run.report)
    rep["inputs"]["base"].update(spec="org/base", from_hub=True, revision="v2", commit=V2)
    rep["inputs"]["adapter"].update(spec="org/qlora@v1", revision="v1", commit=ADAPTER)
    text = card.render(rep)
    meta = yaml.safe_load(text.split("---")[1])
    assert meta == {"base_model": "org/base", "base_model_relation": "quantized", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["gptq", "4-bit", "qlora", "qmerge"]}
    assert "[`org/qlora`](https://huggingface.co/org/qlora) (revision `v1`, commit `" + ADAPTER + "`)" in text
    assert f"Base `org/base` at revision `v2` (commit `{V2}`)" in text


class FakeApi:
    """huggingface_hub's HfApi as far as push uses it, recording the calls."""

    calls: list = []

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create", repo_id, private))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
        self.calls.append(("upload", folder_path, repo_id))


def test_push_to_uploads_the_final_checkpoint_unless_a_budget_failed(tiny_run, monkeypatch, capsys):
    import huggingface_hub

    from qmerge.api import RunResult, push_final

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    assert push_final(tiny_run, "me/x", private=True).summary()["pushed"] == "https://hub.example/me/x"
    assert FakeApi.calls == [("create", "me/x", True), ("upload", str(tiny_run.gptq), "me/x")]
    failed = copy.deepcopy(tiny_run.report)
    failed["budgets"]["max_kld"]["ok"] = False
    assert push_final(RunResult(tiny_run.out, failed), "me/y").pushed is None and len(FakeApi.calls) == 2
    assert "not pushed to me/y: a quality budget failed" in capsys.readouterr().err


@pytest.mark.slow
def test_run_from_the_hub_cache_with_push_to(hub, tmp_path, cli, monkeypatch):
    """`qmerge run --revision v2 --push-to me/x --quiet --json` on the offline cache: report.json holds
    the revisions and commits, the final checkpoint goes up through `push`'s code (a local fake of
    huggingface_hub's HfApi), and --quiet leaves stdout to the JSON line and stderr to warnings."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    out = tmp_path / "out"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_RUN.items()]
    result = cli("run", "--base", "qm/tiny", "--revision", "v2", "--adapter", "qm/adapter@v1", "--out", out, "--candidates", "merged,gptq", "--samples", "1",
                 "--push-to", "me/x", "--private", "--quiet", "--json", *flags)
    assert result.returncode == 0 and "[qmerge]" not in result.stderr, result.stderr[-3000:]  # warnings only (the adapter names a local base)
    summary = json.loads(result.stdout)
    assert summary["pushed"] == "https://hub.example/me/x" and FakeApi.calls == [("create", "me/x", True), ("upload", str(out / "gptq"), "me/x")]
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["revision"] == "v2" and rep["inputs"]["base"]["commit"] == V2 and rep["inputs"]["adapter"]["commit"] == ADAPTER
    assert yaml.safe_load((out / "gptq" / "README.md").read_text().split("---")[1])["base_model"] == "qm/tiny"
    with pytest.raises(QmergeError, match="owner/name"):
        qmerge.run("qm/tiny", "qm/adapter", tmp_path / "never", push_to="no-slash")
    assert not (tmp_path / "never").exists()
