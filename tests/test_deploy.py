"""Deploy path: Python API, recipes, --json and exit codes, quality budgets, model card, servers, push."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qmerge
from conftest import SMALL_RUN
from qmerge import cli, recipe
from qmerge.errors import QmergeError
from qmerge.quant.servers import servers
from qmerge.settings import GPTQSettings

def cli_run(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point in a fresh interpreter: what a deploy script's shell sees."""
    return subprocess.run([sys.executable, "-m", "qmerge.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def api_run(tiny_run):
    """The shared run, made through the Python API as a deploy script calls it (max_kld=1.0)."""
    return tiny_run


def test_api_returns_paths_report_and_budgets(api_run):
    assert api_run.gptq == api_run.out / "gptq" and (api_run.merged / "model.safetensors").exists()
    assert api_run.budgets_ok and api_run.report["budgets"]["max_kld"]["ok"]
    summary = api_run.summary()
    assert summary["final"]["name"] == "gptq 4-bit g32" and summary["final"]["kld_mean"] == api_run.report["evaluations"][0]["metrics"]["gptq 4-bit g32"]["kld_mean"]


def test_model_card_and_servers(api_run):
    text = (api_run.gptq / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "transformers"
    assert {"gptq", "4-bit", "qlora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local base is not a hub id
    assert "| gptq 4-bit g32 |" in text and "| vllm | yes | gptq_marlin |" in text
    for name in ("tokenizer.json", "generation_config.json", "quantize_config.json"):
        assert (api_run.gptq / name).exists()


def test_servers_rules():
    ok = servers(GPTQSettings(bits=4, group_size=64), {576, 1536})
    assert ok["vllm"]["loads"] and ok["sglang"]["loads"] and ok["transformers"]["loads"]
    bad = servers(GPTQSettings(bits=3, group_size=128, sym=False), {576})
    assert not bad["vllm"]["loads"] and bad["transformers"]["loads"]
    assert "3-bit" in bad["vllm"]["why"] and "asymmetric" in bad["vllm"]["why"] and "group size 128" in bad["vllm"]["why"]


def test_resolved_recipe_round_trips(api_run, tmp_path):
    resolved = recipe.load(api_run.out / "recipe.resolved.yaml")
    again = recipe.to_settings(resolved)
    assert recipe.resolved(again) == api_run.report["recipe"]


def test_recipe_precedence(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('base = "b"\nadapter = "a"\nout = "o"\nbits = 8\ngroup-size = 64\n')
    args = cli.build_parser().parse_args(["run", "--recipe", str(path), "--group-size", "32"])
    settings = recipe.to_settings(cli.run_values(args))
    assert (settings.gptq.bits, settings.gptq.group_size, settings.data.seq_len) == (8, 32, 512)  # recipe, flag, default
    bad = tmp_path / "r.yaml"
    bad.write_text("bits: 4\ncolour: blue\n")
    with pytest.raises(QmergeError, match="unknown setting 'colour'"):
        recipe.load(bad)


def test_cli_recipe_json_budget_and_repeat(tiny_base, tiny_adapter, tmp_path, cli):
    """A deploy script's view: one JSON line on stdout, exit 3 on a failed budget, outputs kept;
    the resolved recipe repeats the run byte for byte (flags overriding it)."""
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"base": str(tiny_base), "adapter": str(tiny_adapter), "max-kld": 1e-12, **{k.replace("_", "-"): v for k, v in SMALL_RUN.items()}}))
    first = cli_run("run", "--recipe", str(r), "--out", str(tmp_path / "a"), "--json", "--skip-gptq")
    assert first.returncode == 3, first.stderr[-2000:]
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["exit_status"] == 3 and summary["budgets_ok"] is False and summary["budgets"]["max_kld"]["limit"] == 1e-12
    assert "quality budget failed: max_kld" in first.stderr and Path(summary["merged"], "config.json").exists()  # outputs kept
    second = cli("run", "--recipe", tmp_path / "a" / "recipe.resolved.yaml", "--out", tmp_path / "b", "--max-kld", "1", "--json")
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["budgets_ok"] is True and json.loads(second.stdout)["gptq"] is None
    a, b = (tmp_path / d / "merged" / "model.safetensors" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()  # same inputs and settings: byte-identical merge


def test_json_bad_input_exit_2(tmp_path):
    result = cli_run("run", "--base", str(tmp_path / "nope"), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 2 and json.loads(result.stdout)["exit_status"] == 2
    assert result.stderr.strip().startswith("qmerge: error: base directory")


def test_push_argument_handling(api_run, monkeypatch):
    """Only our argument handling is ours: huggingface_hub's HfApi is replaced by a local fake."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls.append(("upload", folder_path, repo_id, tuple(ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert qmerge.push(api_run.gptq, "me/tiny-GPTQ", private=True) == "https://hub.example/me/tiny-GPTQ"
    assert calls == [("create", "me/tiny-GPTQ", True, True), ("upload", str(api_run.gptq), "me/tiny-GPTQ", ("quantize.log",))]
    with pytest.raises(QmergeError, match="owner/name"):
        qmerge.push(api_run.gptq, "no-slash")
    with pytest.raises(QmergeError, match="not a checkpoint"):
        qmerge.push(api_run.out, "me/x")


@pytest.mark.slow
def test_gptq_checkpoint_is_served_for_real(api_run):
    """`transformers serve` on the produced GPTQ checkpoint, on 127.0.0.1: one chat completion over HTTP."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(api_run.gptq), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up in 300 s"
                time.sleep(2)
        body = {"model": str(api_run.gptq), "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}
        request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=600).read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(answer["choices"][0]["message"]["content"], str) and answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    values = {"base": "b", "adapter": "a", "out": "o", **recipe.load(path)}
    recipe.to_settings(values).validate()
