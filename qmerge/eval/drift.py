"""Drift of each candidate from the reference, the QLoRA model as trained (base loaded in 4-bit by
bitsandbytes, adapter unmerged via PEFT), on one shared token stream.

Every model computes in float32, so the numbers measure weights rather than arithmetic. The
training-time compute dtype (bf16 by default) is measured separately as the noise floor: the same
reference with its 4-bit layers computing in that dtype (`noise_floor`; emulated in float32 where the
device has no native bf16, qmerge.models.precision).

The reference runs once per eval window: its pass keeps what the metrics need (each layer's hidden
state, the last one being the head's input) in a ReferenceCache, in memory or on disk by budget, and
every candidate is then built, run against the cache and released before the next one is built,
so one candidate is resident beside the reference. Inside a forward nothing whole-batch is kept:
each decoder layer's output is reduced against the reference's as the layer finishes (models.taps).
What a candidate leaves is its head and its final hidden states; the token statistics of all of
them are taken in one last pass, the reference's side (its logits, log-probabilities, top-k) once
per span of positions for every candidate, and logits exist one span of positions at a time,
projected from the final hidden states.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from qmerge.eval.finite import check_finite
from qmerge.eval.metrics import Projection, compare, kld_histogram, per_window, summarize
from qmerge.eval.refcache import Key, ReferenceCache
from qmerge.io.dtypes import torch_dtype
from qmerge.io.memory import release, trim
from qmerge.io.progress import Progress as Bar
from qmerge.models.precision import computing_in
from qmerge.models.taps import Taps, same_head

NOISE_FLOOR = "noise floor (reference @ training compute dtype)"
REFERENCE = "reference"
TOKEN_STATS = "token statistics"  # the progress callback's name for the last pass, every model's token statistics
CACHE_BUDGET = 256 * 2**20  # bytes of reference cache held in memory; more goes to disk

Build = Callable[[], torch.nn.Module]
# progress(model, batches done, batches of that model): called after every batch, the reference's first
Progress = Callable[[str, int, int], None]


@contextlib.contextmanager
def noise_floor(reference: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The noise-floor model: the reference with its 4-bit layers computing in the training compute
    dtype, for as long as the block runs."""
    with computing_in(reference, dtype):
        yield reference


class LayerDrift:
    """Per decoder layer, summed over tokens: ‖h − h_ref‖², ‖h_ref‖² and the cosine of h with h_ref,
    so the relative Frobenius error and the mean per-token cosine come out over the whole eval set."""

    def __init__(self, layers: int) -> None:
        self.diff, self.ref, self.cos = ([0.0] * layers for _ in range(3))
        self.tokens = 0

    def add(self, index: int, ref: torch.Tensor, hidden: torch.Tensor) -> None:
        r, h = ref.to(hidden.device).double(), hidden.double()
        self.diff[index] += (h - r).pow(2).sum().item()
        self.ref[index] += r.pow(2).sum().item()
        self.cos[index] += torch.nn.functional.cosine_similarity(h, r, dim=-1).sum().item()

    def rows(self) -> list[dict]:
        return [
            {"layer": i, "rel_error": (d / r) ** 0.5 if r else float("nan"), "cosine": c / self.tokens}
            for i, (d, r, c) in enumerate(zip(self.diff, self.ref, self.cos))
        ]


class Tally:
    """What one eval set has measured so far: per-token series and layer drift, per model."""

    def __init__(self, index: int, windows: torch.Tensor, scored_bytes: int | None = None) -> None:
        self.index = index
        self.windows = windows
        self.scored_bytes = scored_bytes
        self.series: dict[str, defaultdict[str, list[torch.Tensor]]] = {}
        self.layers: dict[str, LayerDrift] = {}

    def batches(self, batch_size: int) -> Iterator[tuple[Key, torch.Tensor]]:
        for start in range(0, len(self.windows), batch_size):
            yield (self.index, start), self.windows[start : start + batch_size]

    def record_reference(self, ref: Taps, cache: ReferenceCache, key: Key, ids: torch.Tensor) -> None:
        final = ref.run(ids[:, :-1], lambda i, h: cache.put(key, i, h))
        check_finite(final, "the reference (QLoRA as trained)", key[1])
        ref.check_head(ids[:, :-1], final)

    def run(self, name: str, taps: Taps, cache: ReferenceCache, key: Key, ids: torch.Tensor) -> torch.Tensor:
        """One batch of one model against the cached reference: its layer drift as each layer
        finishes; returns its final hidden state, from which `score` takes the token statistics."""
        layers = self.layers.setdefault(name, LayerDrift(len(taps.layers)))
        final = taps.run(ids[:, :-1], lambda i, h: layers.add(i, cache.get(key, i), h))
        check_finite(final, f"candidate {name!r}", key[1])
        taps.check_head(ids[:, :-1], final)
        layers.tokens += final.shape[0] * final.shape[1]
        return final

    def score(self, ref: Taps, cache: ReferenceCache, key: Key, ids: torch.Tensor, finals: Mapping[str, tuple[Projection, torch.Tensor]]) -> None:
        """The token statistics of one batch of every model in `finals` (name → its head, its final
        hidden state), against the reference's side computed once for all of them."""
        ref_final = cache.get(key, len(ref.layers) - 1)
        targets = ids[:, 1:]
        for name, s in compare(ref.logits, ref_final, finals, targets, ref.config.vocab_size).items():
            acc = self.series.setdefault(name, defaultdict(list))
            for field in ("nll_ref", "nll", "kld", "top1_same", "top5_same"):
                acc[field].append(getattr(s, field).cpu())

    def result(self, order: list[str]) -> dict:
        """{"metrics": per model in `order`, every number against the reference, the per-token KLD
        histogram and per-window sums; "layers": per model, the hidden-state drift of each layer}."""
        clusters = torch.arange(len(self.windows)).repeat_interleave(self.windows.shape[1] - 1)
        metrics = {}
        for name in order:
            series = {k: torch.cat(v) for k, v in self.series[name].items()}
            metrics[name] = {
                **summarize(**series, clusters=clusters, scored_bytes=self.scored_bytes),
                "kld_hist": kld_histogram(series["kld"]),
                "per_window": per_window(clusters, nll=series["nll"], nll_ref=series["nll_ref"], kld=series["kld"], top1_same=series["top1_same"]),
            }
        return {"metrics": metrics, "layers": {name: self.layers[name].rows() for name in order}}


def cache_bytes(reference: torch.nn.Module, windows: Sequence[torch.Tensor]) -> int:
    """Bytes the reference cache holds for these eval sets: every layer's float32 hidden state of
    every scored window."""
    config = Taps(reference).config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    return sum(len(w) * (w.shape[1] - 1) for w in windows) * layers * hidden * 4


class Scoring:
    """The reference run once over the eval sets into its cache, then any number of candidates scored
    against it (`score`), each metric bit-identical to a fresh `evaluate`: the search scores its
    trials with one Scoring, so the reference runs once per search, not once per trial.

    A candidate's forward gives its layer drift at once; its token statistics wait, as its final
    hidden states (H floats a position) and its head (the reference's where it computes the same
    function, as the base's 16-bit head does: nothing more is held), until `results`, which
    projects the reference's logits and takes its log-probabilities and top-k once per span for
    every candidate waiting: per candidate a head projection and a float64 log-softmax over the
    vocabulary saved (about a fifth of a candidate's cost on a CPU at a 49k vocabulary)."""

    def __init__(self, reference: torch.nn.Module, windows: Sequence[torch.Tensor], batch_size: int = 1, scored_bytes: Sequence[int | None] | None = None,
                 cache_budget: int = CACHE_BUDGET, cache_dir: Path | None = None) -> None:
        self.reference, self.batch_size = reference, batch_size
        self.tallies = [Tally(i, w, b) for i, (w, b) in enumerate(zip(windows, scored_bytes or [None] * len(windows)))]
        self.batches = sum(-(-len(t.windows) // batch_size) for t in self.tallies)
        self.ref = Taps(reference)
        self.cache = ReferenceCache(cache_bytes(reference, windows), cache_budget, cache_dir)
        self.final_bytes = self.cache.total_bytes // self.ref.config.num_hidden_layers  # one model's final hidden states
        self.cache_budget, self.cache_dir = cache_budget, cache_dir
        self.waiting: dict[str, tuple[Projection, ReferenceCache]] = {}

    @torch.inference_mode()
    def run_reference(self, step: Callable[[int], None] = lambda _: None) -> None:
        for tally in self.tallies:
            for done, (key, ids) in enumerate(tally.batches(self.batch_size), 1):
                tally.record_reference(self.ref, self.cache, key, ids)
                step(done)

    @torch.inference_mode()
    def score(self, name: str, model: torch.nn.Module, step: Callable[[int], None] = lambda _: None) -> None:
        """`model` on every batch of every eval set, against the cached reference: its layer drift;
        its final hidden states kept (in memory up to an eighth of the cache budget, on disk beyond)
        with its head for `results`. `model` itself may go once this returns."""
        taps, done = Taps(model), 0
        self._close_waiting([name])  # scored again: its earlier pass is replaced
        finals = ReferenceCache(self.final_bytes, self.cache_budget // 8, self.cache_dir)
        for tally in self.tallies:
            for key, ids in tally.batches(self.batch_size):
                finals.put(key, 0, tally.run(name, taps, self.cache, key, ids))
                trim()  # glibc keeps a batch's freed activations otherwise
                done += 1
                step(done)
        self.waiting[name] = (self._head(taps), finals)

    def _head(self, taps: Taps) -> Projection:
        """The model's head projection, or the same function held already (the reference's, or one
        a waiting model left): candidates mostly carry the base's head (vocabulary × hidden: 1 GB in
        16 bits for a Llama-3-8B), which the reference holds in float32 anyway."""
        own = taps.projection()
        for project in (self.ref.projection(), *(p for p, _ in self.waiting.values())):
            if same_head(project, own):
                return project
        return own

    def results(self, names: Sequence[str], step: Callable[[int], None] = lambda _: None) -> list[dict]:
        """Per eval set, Tally.result of these models, after the token statistics of every model
        waiting (`step` after each batch of them)."""
        self._score_waiting(step)
        return [t.result(list(names)) for t in self.tallies]

    @torch.inference_mode()
    def _score_waiting(self, step: Callable[[int], None]) -> None:
        try:
            done = 0
            for tally in self.tallies:
                for key, ids in tally.batches(self.batch_size):
                    tally.score(self.ref, self.cache, key, ids, {name: (project, finals.get(key, 0)) for name, (project, finals) in self.waiting.items()})
                    trim()
                    done += 1
                    step(done)
        finally:
            self._close_waiting(list(self.waiting))

    def _close_waiting(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self.waiting:
                self.waiting.pop(name)[1].close()

    def __enter__(self) -> Scoring:
        return self

    def __exit__(self, *exc) -> None:
        self._close_waiting(list(self.waiting))
        self.cache.close()


@torch.inference_mode()
def evaluate(
    reference: torch.nn.Module,
    candidates: Mapping[str, Build],
    windows: Sequence[torch.Tensor],
    training_compute_dtype: str,
    batch_size: int = 1,
    show_progress: bool = True,
    scored_bytes: Sequence[int | None] | None = None,
    cache_budget: int = CACHE_BUDGET,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Per eval set (`windows`, one tensor of windows each): Tally.result of every candidate and
    the noise floor against the reference.

    The reference runs first, once per batch, into the cache; then each candidate is built when its
    turn comes, scored on every eval set, and released before the next is built; the noise floor is
    the reference itself in the training compute dtype. Scored positions: in each window of L
    tokens, the L−1 next-token predictions from the window's own prefix (no context carried across
    windows); standard errors are clustered by window."""
    floor_dtype = torch_dtype(training_compute_dtype)
    names = [*candidates, *([NOISE_FLOOR] if floor_dtype != torch.float32 else [])]
    with Scoring(reference, windows, batch_size, scored_bytes, cache_budget, cache_dir) as scoring, \
            _reporter(progress, show_progress, (2 + len(names)) * scoring.batches) as step:
        scoring.run_reference(lambda done: step(REFERENCE, done, scoring.batches))
        for name in names:
            with _model(name, candidates, reference, floor_dtype) as model:
                scoring.score(name, model, lambda done: step(name, done, scoring.batches))
            del model
            release()  # the candidate's weights go before the next one is built
        return scoring.results(names, lambda done: step(TOKEN_STATS, done, scoring.batches))


@contextlib.contextmanager
def _model(name: str, candidates: Mapping[str, Build], reference: torch.nn.Module, floor_dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    if name == NOISE_FLOOR:
        with noise_floor(reference, floor_dtype) as model:
            yield model
        return
    model = candidates[name]()
    release()  # what building it freed (a copy's temporaries) goes back before it runs
    yield model


@contextlib.contextmanager
def _reporter(progress: Progress | None, show_progress: bool, total: int) -> Iterator[Progress]:
    """The progress callback, plus progress over every batch of every model when asked (a bar on a
    terminal, timed lines elsewhere), naming the model being scored."""
    with Bar(total, "drift", "batch", enabled=None if show_progress else False) as bar:

        def step(model: str, done: int, of: int) -> None:
            bar.note(model)
            bar.update()
            if progress is not None:
                progress(model, done, of)

        yield step
