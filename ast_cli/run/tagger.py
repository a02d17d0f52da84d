"""The tagging API: a loaded model (a ``LocalBackend``) plus the engine -> typed results per file.

    >>> tagger = Tagger.load("MIT/ast-finetuned-audioset-10-10-0.4593", RunOptions(device="cpu"))
    >>> for result in tagger.classify(["song.wav"]):
    ...     print(result.labels[0].label, result.labels[0].score)

``classify`` takes paths, ``inputs.InputFile``s or any ``sources.AudioSource`` (an array, a byte stream).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Iterator

import numpy as np

from ..constants import DEFAULT_MODEL
from ..errors import UsageError
from .options import Activation, Aggregate, RunOptions

if TYPE_CHECKING:  # torch comes with these; deciding what is left to do must not wait for it
    from .engine import Engine, FileOutput
    from ..audio.features import FeatureConfig
    from ..checkpoint.hub import DownloadProgress


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int  # within its head's labels
    score: float
    head: str | None = None  # with heads (``Tagger.load(heads=...)``): whose label; None when the model runs alone


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    labels: list[LabelScore]


@dataclass
class FileResult:
    """One input file's tags (``labels`` sorted by score, descending) or its ``error``."""

    path: str
    duration: float | None
    labels: list[LabelScore] = field(default_factory=list)
    error: str | None = None
    segments: list[Segment] | None = None
    size: int | None = None
    mtime: float | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # behind ``error``
    none_of: bool = False  # single-label, calibrated: the best label is under its threshold (``labels`` empty)


@dataclass(frozen=True)
class LabelSelection:
    """Which labels to report: the ``top`` best (None = all) with score >= ``threshold``,
    restricted to ``include`` and without ``exclude`` (label names, case-insensitive).

    ``thresholds``: calibrated thresholds, one per label of the model in its order (NaN: none for that label).
    A label that has one is reported when its score reaches it, whatever ``top``; the labels without one are
    chosen by ``top`` and ``threshold`` as above."""

    top: int | None = 5
    threshold: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    thresholds: tuple[float, ...] | None = None

    @classmethod
    def from_options(cls, top: int | None, threshold: float | None, include=None, exclude=None,
                     activation: Activation | str | None = None, fast: bool = False) -> "LabelSelection":
        """``top`` None: 5, or all labels when a threshold is given; 0: all. A threshold must be a score the
        activation can give (sigmoid and softmax scores lie in [0, 1]). ``fast`` (``RunOptions.fast``) bounds
        how far scores move from fp32's, not raw logits (which moved 0.025 where the scores moved 0.006)."""
        if fast and activation is not None and Activation(activation) is Activation.none:
            raise UsageError("raw logits go with no fast mode: it keeps scores within 0.02 of fp32's, and logits "
                             "move more; choose the mode by hand instead (bf16, or int8)",
                             option="activation", suggest={"fast": None, "dtype": "bf16"})
        if threshold is not None:
            bounded = activation is None or Activation(activation) is not Activation.none
            if not math.isfinite(threshold) or (bounded and not 0.0 <= threshold <= 1.0):
                raise UsageError(f"must be a score from 0 to 1, not {threshold}" if bounded
                                 else f"must be a finite number, not {threshold}", option="threshold")
        if top is not None and top < 0:
            raise UsageError("must be 0 (all) or more", option="top")
        if top is None:
            top = None if threshold is not None else 5
        return cls(top=top or None, threshold=threshold, include=tuple(include or ()),
                   exclude=tuple(exclude or ()))

    def mask(self, labels: tuple[str, ...], heads: tuple[str, ...] | None = None) -> np.ndarray:
        """Boolean (num_labels,) of labels allowed by include/exclude; unknown names are a UsageError. ``heads``:
        the head of each label, when there are several: a name then matches that label in every head, and
        ``HEAD:LABEL`` in that head only."""
        if self.thresholds is not None and len(self.thresholds) != len(labels):
            raise UsageError(f"{len(self.thresholds)} calibrated thresholds for {len(labels)} labels",
                             option="thresholds")
        names = list(labels) + ([f"{h}:{x}" for h, x in zip(heads, labels)] if heads else [])
        lowered = [name.lower() for name in names]
        index: dict[str, list[int]] = {}
        for i, name in enumerate(lowered):
            index.setdefault(name, []).append(i % len(labels))

        def find(name: str) -> list[int]:
            key = name.strip().lower()
            if key not in index:
                close = difflib.get_close_matches(key, lowered, n=1)
                hint = f" (did you mean {names[lowered.index(close[0])]!r}?)" if close else ""
                raise UsageError(f"unknown label {name!r}{hint}", option="labels")
            return index[key]

        allowed = np.ones(len(labels), dtype=bool)
        if self.include:
            allowed[:] = False
            allowed[[i for n in self.include for i in find(n)]] = True
        for name in self.exclude:
            allowed[find(name)] = False
        return allowed

    def calibrated(self, labels: tuple[str, ...], thresholds: dict[str, float], owner: str | None = None,
                   source: str | None = None) -> "LabelSelection":
        """This selection with ``thresholds`` (label name -> calibrated threshold) over the model's ``labels``;
        a name the model (or head ``owner``; ``source``: the file) does not have is a UsageError."""
        from dataclasses import replace

        unknown = sorted(set(thresholds) - set(labels))
        if unknown:
            raise UsageError(f"the calibrated thresholds{f' in {source}' if source else ''} name label {unknown[0]!r}, "
                             f"which {f'head {owner}' if owner else 'the model'} does not have"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                             option="heads" if owner else "thresholds")
        return replace(self, thresholds=tuple(float(thresholds.get(name, math.nan)) for name in labels))

    def calibrated_parts(self, parts, thresholds: list[dict[str, float] | None], owners=None,
                         sources=None) -> "LabelSelection":
        """``calibrated`` over several heads (``parts``: ``HeadPart``s in their order): each head's labels take its
        own thresholds (None: that head has none), placed where ``select`` looks for them (each part's offset).
        ``owners``/``sources``: each part's ``calibrated`` arguments of the same names (None: the model's, no file)."""
        from dataclasses import replace

        owners, sources = owners or [None] * len(parts), sources or [None] * len(parts)
        values = [v for part, own, owner, source in zip(parts, thresholds, owners, sources)
                  for v in self.calibrated(part.labels, own or {}, owner, source).thresholds]
        return replace(self, thresholds=tuple(values))

    def select(self, scores: np.ndarray, labels: tuple[str, ...], allowed: np.ndarray,
               head: str | None = None, offset: int = 0) -> list[LabelScore]:
        """The labels to report from ``scores`` (one head's: ``labels``, at ``offset`` among all the heads' labels,
        which ``thresholds`` and ``mask`` count over), best first."""
        order = np.argsort(-scores, kind="stable")
        calibrated = np.asarray(self.thresholds[offset:offset + len(labels)] if self.thresholds is not None
                                else [math.nan] * len(labels))
        picked, fallback = [], 0
        for i in order:
            if not allowed[i]:
                continue
            if not math.isnan(calibrated[i]):  # a calibrated label: its own threshold, whatever --top says
                if scores[i] >= calibrated[i]:
                    picked.append(LabelScore(labels[i], int(i), float(scores[i]), head))
                continue
            if (self.threshold is not None and scores[i] < self.threshold) or (
                    self.top is not None and fallback >= self.top):
                if self.thresholds is None:
                    break  # scores only fall from here: nothing more to pick
                continue
            picked.append(LabelScore(labels[i], int(i), float(scores[i]), head))
            fallback += 1
        return picked

    def none_of(self, scores: np.ndarray, allowed: np.ndarray, offset: int = 0) -> bool:
        """Single-label scores (one head's, at ``offset``): whether the best allowed label has a calibrated
        threshold that its score is under (the clip is none of these labels, rather than forced into the best of
        them, or into another whose lower threshold it reaches)."""
        if self.thresholds is None or not allowed.any():
            return False
        best = int(np.flatnonzero(allowed)[np.argmax(scores[allowed])])
        threshold = self.thresholds[offset + best]
        return not math.isnan(threshold) and scores[best] < threshold


def activate(logits: np.ndarray, activation: Activation | str) -> np.ndarray:
    """(..., num_labels) raw logits -> scores. AudioSet is multi-label, so sigmoid is the default."""
    activation = Activation(activation)
    logits = logits.astype(np.float64)
    if activation is Activation.sigmoid:
        return 1.0 / (1.0 + np.exp(-logits))
    if activation is Activation.softmax:
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return logits


@dataclass(frozen=True)
class HeadPart:
    """One head's share of a row of logits: its ``labels`` at [start, start + len(labels)). ``name`` is None
    when the model runs alone (its labels then name no head)."""

    name: str | None
    labels: tuple[str, ...]
    single_label: bool
    start: int = 0

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + len(self.labels))


class Scorer:
    """Logits of one or more heads side by side -> scores (each head's ``activation``; None: softmax for a
    single-label head, sigmoid for the others) -> each head's selected labels in turn (``selection`` per head)."""

    def __init__(self, parts: Iterable[HeadPart], selection: LabelSelection, activation: Activation | str | None):
        self.parts, self.selection = tuple(parts), selection
        self.activations = [Activation(activation) if activation is not None else
                            Activation.softmax if p.single_label else Activation.sigmoid for p in self.parts]
        self.labels = tuple(x for p in self.parts for x in p.labels)
        heads = tuple(p.name for p in self.parts for _ in p.labels) if self.parts[0].name is not None else None
        self.names = tuple(f"{h}:{x}" for h, x in zip(heads, self.labels)) if heads else self.labels
        self.allowed = selection.mask(self.labels, heads)  # unknown label names fail before any work

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """(..., total labels) logits -> scores, each head's activation on its own labels."""
        return np.concatenate([activate(logits[..., p.span], a) for p, a in zip(self.parts, self.activations)], -1)

    def select(self, scores: np.ndarray) -> list[LabelScore]:
        """(total labels,) scores -> the labels ``selection`` picks, head by head (each sorted by score); a
        single-label head (or model) whose best label is under its calibrated threshold reports none."""
        return [x for p, a in zip(self.parts, self.activations)
                if not (a is Activation.softmax and self.selection.none_of(scores[p.span], self.allowed[p.span],
                                                                           p.start))
                for x in self.selection.select(scores[p.span], p.labels, self.allowed[p.span], p.name, p.start)]

    def none_of(self, scores: np.ndarray) -> bool:
        """A single-label model alone, with calibrated thresholds: whether its best label is under its threshold
        (with heads, a head's labels under their thresholds are simply not reported)."""
        part, activation = self.parts[0], self.activations[0]
        return (len(self.parts) == 1 and activation is Activation.softmax
                and self.selection.none_of(scores[part.span], self.allowed[part.span]))


def is_single_label(config) -> bool:
    """A checkpoint trained with one label per clip: its ``problem_type`` says so, or it is speech-commands."""
    if config.problem_type == "single_label_classification":
        return True
    if config.problem_type == "multi_label_classification":
        return False
    from ..checkpoint.names import load_labels

    return config.id2label == load_labels("speechcommands")


class Tagger:
    """A model ready for inference (``backend``), with the input format and labels it was trained with."""

    def __init__(self, backend, labels: tuple[str, ...], *, name: str = "", options: RunOptions = RunOptions(),
                 single_label: bool = False, source: str | None = None, heads: tuple = (), base_head: bool = True):
        self.backend = backend
        self.heads = tuple(heads)  # checkpoint.heads.Head: run next to the model's own head on its embedding
        self.base_head = base_head  # False: the model's own labels are left out (only with heads)
        self.source = source  # the weights file, when loaded from one: what caches of its outputs are keyed by
        self.features: FeatureConfig = backend.features
        self.labels = labels
        self.name = name
        self.options = options
        self.single_label = single_label

    @property
    def default_activation(self) -> Activation:
        """softmax for a single-label checkpoint (its ``problem_type``, or speech-commands), else sigmoid."""
        return Activation.softmax if self.single_label else Activation.sigmoid

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, options: RunOptions = RunOptions(), *,
             progress: DownloadProgress | None = None,
             loading: ContextManager | None = None, heads: Iterable[str] = (),
             base_head: bool = True, embeddings: bool = False) -> "Tagger":
        """The one load path: resolve ``model`` (alias, hub id, directory or file; downloaded on first use unless
        offline, told to ``progress``), load it strictly and place it as ``options`` say
        (``LocalBackend.build``). ``loading``: a context manager held while the weights load and are placed (the
        CLI's spinner). ``options`` was checked when it was built. ``heads``: folders written by head-mode
        training on this model, run on the pooled embedding of the same backbone pass (``HeadError``, before the
        model loads where it can: a missing folder, not a head; after: one trained on another base);
        ``base_head`` False: without the model's own labels. ``embeddings``: the caller reports the pooled
        embeddings (extract-features, index), which ``--fast`` then keeps within its bound."""
        from .backends import LocalBackend
        from ..checkpoint.heads import check_bases, read_heads
        from ..checkpoint.hub import resolve_model
        from ..checkpoint.weights import backbone_fingerprint, build_model, load_checkpoint

        loaded = read_heads(heads, base_head)
        path = resolve_model(model, offline=options.offline, cache_dir=options.cache_dir, progress=progress)
        with loading or contextlib.nullcontext():
            checkpoint = load_checkpoint(path)
            network = build_model(checkpoint)
            if loaded:  # the fingerprint of the float32 weights as loaded, before any dtype or int8 placement
                check_bases(loaded, backbone_fingerprint(network), model, network.config.hidden_size)
            backend = LocalBackend.build(network, checkpoint.features, options, heads=loaded, embeddings=embeddings)
        return cls(backend, checkpoint.config.id2label, name=model, options=options,
                   single_label=is_single_label(checkpoint.config), source=checkpoint.source, heads=loaded,
                   base_head=base_head and bool(checkpoint.config.id2label))  # a bare encoder has no head

    @property
    def scoring_backend(self):
        """What ``classify`` runs on each batch: the model itself, or (with heads) its embedding through every head."""
        if not self.heads:
            return self.backend
        from .backends import HeadsBackend

        return HeadsBackend(self.backend, self.heads, self.base_head)

    def parts(self) -> tuple[HeadPart, ...]:
        """The heads in a row of ``scoring_backend``'s logits (``head_parts``)."""
        return head_parts(self.name, self.labels, self.single_label, self.heads, self.base_head)

    def scorer(self, selection: LabelSelection = LabelSelection(), activation: Activation | str | None = None):
        """The ``Scorer`` of this tagger's heads (``activation`` None: each head's own default)."""
        return Scorer(self.parts(), selection, activation)

    @property
    def model(self):
        return self.backend.model

    @property
    def device(self) -> str:
        return self.backend.device

    # -- model calls -----------------------------------------------------------------------------

    def logits(self, inputs) -> "torch.Tensor":  # noqa: F821
        """(B, T, F) features -> (B, num_labels) float32 raw logits on the CPU."""
        return self.backend.with_output("logits").tensor(inputs)

    def embed(self, inputs) -> "torch.Tensor":  # noqa: F821
        """(B, T, F) features -> (B, hidden_size) float32 pooled embeddings on the CPU."""
        return self.backend.with_output("embedding").tensor(inputs)

    def head(self, embeddings: np.ndarray) -> np.ndarray:
        """(W, hidden_size) pooled embeddings -> (W, num_labels) float32 logits: the classifier alone, in the
        model's dtype (an embedding is a float32 copy of it: casting back is exact)."""
        import torch

        return self.backend.forward_head(torch.from_numpy(np.ascontiguousarray(embeddings))).numpy()

    def engine(self, backend=None) -> Engine:
        """An engine over this tagger's windows (its ``options``: hop, batch size, workers)."""
        from .engine import Engine

        return Engine(self.features, backend or self.scoring_backend, batch_size=self.options.batch_size,
                      workers=self.options.workers, hop_frames=self.options.hop_frames)

    # -- tagging -------------------------------------------------------------------------------

    def classify(
        self,
        sources: Iterable,
        *,
        selection: LabelSelection = LabelSelection(),
        activation: Activation | str | None = None,
        aggregate: Aggregate | str = Aggregate.max,
        segments: bool = False,
        engine: Engine | None = None,
        on_progress: Callable[[FileOutput], None] | None = None,
    ) -> Iterator[FileResult]:
        """Tag sources (paths, ``InputFile``s or ``AudioSource``s); one ``FileResult`` each, in order. Long
        files are cut into windows whose scores are aggregated (``max``: an event anywhere in the file
        counts; ``mean``: typical content). ``activation`` None: ``default_activation``. ``engine``: one made
        by ``self.engine()``, to ``stop()`` it."""
        scorer = self.scorer(selection, activation)  # unknown label names fail before any work
        aggregate = Aggregate(aggregate)
        engine = engine or self.engine()
        for out in engine.run(sources, on_progress=on_progress):
            yield self.result(out, scorer, aggregate, segments)

    def result(self, out: FileOutput, scorer: Scorer, aggregate: Aggregate, segments: bool) -> FileResult:
        """One engine output (logits per window) -> its ``FileResult`` (labels head by head)."""
        result = FileResult(out.name, out.duration, error=out.error, size=out.size, mtime=out.mtime,
                            exception=out.exception)
        if out.error is not None or out.outputs is None or len(out.outputs) == 0:
            if result.error is None:
                result.error = "no audio windows"
            return result
        scores = scorer.scores(out.outputs)  # (W, L)
        if not np.isfinite(scores).all():
            result.error = "the model gave non-finite scores (the audio is far outside [-1, 1]?)"
            return result
        pooled = scores.max(axis=0) if aggregate is Aggregate.max else scores.mean(axis=0)
        result.labels = scorer.select(pooled)
        if scorer.none_of(pooled):
            result.labels, result.none_of = [], True
        if segments:
            result.segments = []
            for (start, end), row in zip(out.windows, scores):
                # The last window ends with the file (16 kHz rounding aside), never after it.
                end = out.duration if out.duration is not None and end >= out.duration - 1e-3 else end
                labels = scorer.select(row)
                result.segments.append(Segment(round(start, 6), round(end, 6), labels))
        return result


def base_head_name(model: str) -> str:
    """The name the model's own head goes by next to other heads: a hub name as given, a local one's file name."""
    import os

    from ..checkpoint.names import looks_local

    return os.path.basename(os.path.normpath(model)) if looks_local(model) else model


def no_labels(model: str) -> UsageError:
    """What scoring a bare encoder (no labels) without heads is: it has nothing to score."""
    return UsageError(f"{model} has no labels of its own (a bare encoder): it scores nothing without a head trained "
                      "on it (its embeddings need none)", option="model", suggest={"heads": "HEAD_DIR"})


def head_parts(model: str, labels: tuple[str, ...], single_label: bool, heads=(), base_head: bool = True
               ) -> tuple[HeadPart, ...]:
    """The parts of a row of logits: the model's own head (named after ``model``, unless ``base_head`` is False),
    then each of ``heads`` (``checkpoint.heads.Head``); the model alone: one part named None. A head named as the
    model's own head is a UsageError, and so is a bare encoder (no labels) without heads: it has nothing to score."""
    if not heads:
        if not labels:
            raise no_labels(model)
        return (HeadPart(None, labels, single_label),)
    own = [(base_head_name(model), labels, single_label)] if base_head and labels else []
    twin = next((h for h in heads if own and h.name == own[0][0]), None)
    if twin is not None:  # records, HEAD:LABEL and thresholds could not tell the two apart
        raise UsageError(f"head {twin.path} is named {twin.name!r}, as the model's own labels are: set \"name\" in "
                         "its head.json", option="heads")
    parts, start = [], 0
    for name, names, single in own + [(h.name, h.labels, h.single_label) for h in heads]:
        parts.append(HeadPart(name, names, single, start))
        start += len(names)
    return tuple(parts)
