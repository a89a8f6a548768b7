"""Recipes: every setting of a run in one reviewed, versionable YAML or TOML file.

A recipe is a flat mapping of the CLI's long options (dashes or underscores), for example

    base: HuggingFaceTB/SmolLM2-135M-Instruct
    adapter: my-org/smollm2-qlora
    bits: 4
    group-size: 64

Precedence: CLI flag > recipe > built-in default. Every run writes the fully resolved recipe to
DIR/recipe.resolved.yaml (and into report.json), so `qmerge run --recipe DIR/recipe.resolved.yaml
--out NEW` repeats it exactly.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from qmerge.errors import QmergeError
from qmerge.settings import DataSettings, GPTQSettings, NF4Settings, RunSettings

_SECTIONS = {"nf4": NF4Settings, "gptq": GPTQSettings, "data": DataSettings}
_RENAMED = {("nf4", "blocksize"): "nf4_blocksize", ("gptq", "desc_act"): "act_order"}  # flags that say more than their field
_PER_INVOCATION = ("overwrite", "resume", "nf4_given")  # not settings of the run: how this invocation treats DIR, or derived


def _keys() -> dict[str, tuple[str | None, str]]:
    """Flat key -> (section, field), section None for RunSettings' own fields: one per field of the settings."""
    keys = {f.name: (None, f.name) for f in fields(RunSettings) if f.name not in (*_PER_INVOCATION, *_SECTIONS)}
    for section, cls in _SECTIONS.items():
        keys.update({_RENAMED.get((section, f.name), f.name): (section, f.name) for f in fields(cls)})
    return keys


KEYS = _keys()
LISTS = ("skip_modules", "candidates", "eval", "checkpoints")  # tuple settings; a recipe or flag may write them comma-separated


def defaults() -> dict:
    """The built-in value of every recipe key."""
    made = {name: cls() for name, cls in _SECTIONS.items()}
    run_defaults = {f.name: None if f.default is MISSING else f.default for f in fields(RunSettings)}
    out = {}
    for key, (section, name) in KEYS.items():
        out[key] = getattr(made[section], name) if section else run_defaults.get(name)
    for key in LISTS:
        out[key] = list(out[key])
    return out


def load(path: Path) -> dict:
    """A recipe file as a flat dict with underscore keys; unknown keys are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise QmergeError(f"recipe {path} does not exist; pass a .yaml, .yml or .toml file")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise QmergeError(f"recipe {path} does not parse ({type(e).__name__}); fix its syntax") from e
    if not isinstance(raw, dict):
        raise QmergeError(f"recipe {path} must be a mapping of settings, like 'bits: 4'")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise QmergeError(f"recipe {path}: unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(KEYS))}")
    return split_lists(values)


def split_lists(values: dict) -> dict:
    """List settings may be written as comma-separated strings ("none" for an empty list)."""
    for key in LISTS:
        if isinstance(values.get(key), str):
            values[key] = [s for s in values[key].split(",") if s and s != "none"]
    return values


def to_settings(values: dict, overwrite: bool = False, resume: bool = False) -> RunSettings:
    """Flat values (defaults filled in) → RunSettings; base, adapter and out must be set."""
    flat = {**defaults(), **split_lists({k: v for k, v in values.items() if v is not None or k in ("max_kld", "max_ppl_ratio")})}
    for key in ("base", "adapter", "out"):
        if not flat.get(key):
            raise QmergeError(f"--{key} is required (or set '{key}:' in the recipe)")
    sections: dict[str | None, dict] = {None: {}, "nf4": {}, "gptq": {}, "data": {}}
    for key, (section, name) in KEYS.items():
        sections[section][name] = flat[key]
    for key in LISTS:
        section, name = KEYS[key]
        sections[section][name] = tuple(sections[section][name] or ())
    top = sections[None]
    top["out"] = Path(top["out"])
    nf4_given = given_nf4(values)
    try:
        return RunSettings(
            **top, overwrite=overwrite, resume=resume, nf4_given=nf4_given, **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
        )
    except TypeError as e:
        raise QmergeError(f"a setting has the wrong type ({e}); check the recipe") from e


def given_nf4(values: dict) -> tuple[str, ...]:
    """The NF4Settings fields set in flat `values` (a pre-quantized base refuses them when they disagree)."""
    return tuple(name for key, (section, name) in KEYS.items() if section == "nf4" and values.get(key) is not None)


def nf4_settings(values: dict) -> NF4Settings:
    """NF4Settings from flat values (recipe keys), defaults for the rest."""
    given = {name: values[key] for key, (section, name) in KEYS.items() if section == "nf4" and values.get(key) is not None}
    if "skip_modules" in given:
        given["skip_modules"] = tuple(given["skip_modules"])
    return NF4Settings(**given)


def resolved(settings: RunSettings) -> dict:
    """The flat recipe that reproduces `settings` (overwrite deliberately left out)."""
    out = {}
    for key, (section, name) in KEYS.items():
        value = getattr(getattr(settings, section) if section else settings, name)
        out[key.replace("_", "-")] = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
    return out


def dump(settings: RunSettings, path: Path) -> None:
    header = "# Written by qmerge: repeat this run with  qmerge run --recipe THIS_FILE --out NEW_DIR\n"
    path.write_text(header + yaml.safe_dump(resolved(settings), sort_keys=False))
