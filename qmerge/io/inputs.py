"""Resolve BASE and ADAPTER arguments to local directories: a local folder as is, otherwise a
Hugging Face hub id, pinned to a revision when given (`--revision REV`, or `ID@REV`), fetched with
huggingface_hub: only what a transformers load reads (top-level safetensors, configs, tokenizer,
chat template; a repository's own `*.py` with --trust-remote-code), not the `consolidated.safetensors`
twin of Mistral-style repositories or the `original/` folder of Meta's, which would double the download."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoConfig

from qmerge.errors import QmergeError
from qmerge.io.atomic import write_file
from qmerge.io.corpus import cache_dir
from qmerge.io.manifests import file_sha256, stamp

def hub_patterns(trust_remote_code: bool = False) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns of a hub download: the top-level files a transformers or PEFT load reads."""
    allow = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", *(["*.py"] if trust_remote_code else [])]
    return allow, ["*/*", "consolidated*"]


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """"org/name@REV" -> ("org/name", "REV"); a `revision` given beside must agree."""
    repo, sep, pinned = spec.partition("@")
    if not sep:
        return spec, revision
    if not pinned or (revision is not None and revision != pinned):
        raise QmergeError(f"{spec!r} pins revision {pinned or '(empty)'!r} but --revision says {revision!r}; give the revision once")
    return repo, pinned


def resolve(spec: str, what: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A local directory, or a hub id (at `revision`, or pinned as ID@REV) downloaded to the hub
    cache (network only when named; HF_HUB_OFFLINE=1 reads the cache alone)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QmergeError(f"{what} {spec} is a file; pass the directory that holds it")
        return path
    repo, revision = split_revision(spec, revision)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise QmergeError(f"{what} directory {spec} does not exist; pass an existing folder or a hub id such as org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    allow, ignore = hub_patterns(trust_remote_code)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise QmergeError(f"cannot fetch {what} {repo!r}{at} from the hub ({type(e).__name__}); check the id, the revision, your network and HF_TOKEN") from e


def hub_origin(spec: str, path: Path, revision: str | None = None) -> dict:
    """For the report: the revision asked for and the commit the hub cache resolved it to (its
    snapshot folder's name); nothing for a local folder."""
    if Path(spec).expanduser().exists():
        return {}
    _, revision = split_revision(spec, revision)
    return {"revision": revision, "commit": path.name if path.parent.name == "snapshots" else None}


def load_base_config(base: Path, trust_remote_code: bool = False):
    """The base's transformers config. A bitsandbytes 4-bit checkpoint is a valid base (QLoRA loads it
    as stored); any other quantization (GPTQ, AWQ, bitsandbytes 8-bit, ...) is not what a QLoRA
    adapter was trained on and is refused here, as is remote code without trust_remote_code."""
    if not (base / "config.json").exists():
        raise QmergeError(f"{base} has no config.json; pass a Hugging Face model directory")
    raw = json.loads((base / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise QmergeError(f"{base} needs remote code (auto_map in config.json); pass --trust-remote-code if you trust it")
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization_method(quantization)
        if method != "bitsandbytes 4-bit":
            raise QmergeError(f"{base} is already quantized ({method}); pass the bf16/fp16 base or the bitsandbytes 4-bit checkpoint the adapter was trained on")
    return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)


def quantization_method(quantization_config: dict) -> str:
    """A config's quantization in words: bitsandbytes 4-bit, bitsandbytes 8-bit, or its quant_method."""
    method = str(quantization_config.get("quant_method", "unknown method"))
    if method == "bitsandbytes":
        if quantization_config.get("load_in_4bit") or quantization_config.get("_load_in_4bit"):
            return "bitsandbytes 4-bit"
        return "bitsandbytes 8-bit" if quantization_config.get("load_in_8bit") or quantization_config.get("_load_in_8bit") else "bitsandbytes, neither 4- nor 8-bit"
    return method


def tree_sha256(directory: Path, verify: bool = False) -> str:
    """One hash over the names and sha256s of every file under `directory` (inputs' identity in the
    report and the stage keys). Each file is hashed once: its digest is kept in the hash cache under
    its resolved path, size and modification time and reused while those stay the same (an 8B base
    is 16 GB to read on every run otherwise); `verify` reads every file again."""
    cache = HashCache.load()
    h = hashlib.sha256()
    for p in sorted(q for q in Path(directory).rglob("*") if q.is_file() and ".cache" not in q.parts):
        h.update(str(p.relative_to(directory)).encode())
        h.update(cache.sha256(p, verify).encode())
    cache.save()
    return h.hexdigest()


class HashCache:
    """sha256 of input files by (resolved path, size, modification time), in $QMERGE_CACHE."""

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> HashCache:
        path = cache_dir() / "file-hashes.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def sha256(self, path: Path, verify: bool) -> str:
        real = str(Path(path).resolve())  # a hub snapshot's files are links to its blobs
        now = stamp(Path(real))
        known = self.entries.get(real)
        if not verify and isinstance(known, dict) and {k: known.get(k) for k in now} == now and "sha256" in known:
            return known["sha256"]
        digest = file_sha256(Path(real))
        self.entries[real] = {"sha256": digest, **now}
        self.changed = True
        return digest

    def save(self) -> None:
        """Written whole beside and renamed over, so concurrent runs never read half a file; a cache
        that cannot be written (read-only home) only costs hashing again next time."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file(self.path, json.dumps(self.entries))
        except OSError:
            pass
