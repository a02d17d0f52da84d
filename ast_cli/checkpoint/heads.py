"""Heads: classifiers trained on a base model's pooled embedding (``ast train --mode head``), saved so that they
run next to the base's own classifier on one backbone pass.

A head folder is also a full standalone checkpoint (``config.json``, ``model.safetensors``: transformers loads
it); two more files make it a head:

- ``head.json``: ``format`` ("ast-cli-head"), ``version``, ``labels``, ``problem_type``, ``hidden_size``,
  ``layer_norm_eps``, an optional ``name`` (default: the folder's name) and ``base``: ``model`` (hub
  ``ORG/NAME@<commit>`` or the local path it was trained from) and ``backbone_sha256``
  (``weights.backbone_fingerprint`` of that base, computed when it was loaded for training).
- ``head.safetensors``: ``standardize.mean``/``standardize.std`` (D,) and ``classifier.layernorm.*``,
  ``classifier.dense.*``. Training standardizes the embeddings and folds that map into the standalone
  checkpoint's final backbone LayerNorm, so the classifier keys of ``model.safetensors`` alone would not fit
  the base's embedding, and the map cannot be read back from the folded weights exactly: hence a file of its
  own, which also loads without reading the whole model (344 MB at AudioSet size).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, HeadError, UsageError
from .names import read_json

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
FORMAT, VERSION = "ast-cli-head", 1
SINGLE, MULTI = "single_label_classification", "multi_label_classification"
MAX_LABELS = 100_000
MAX_HIDDEN = 1 << 16
NAME_RULE = "printable, up to 200 characters, without a colon"
HEADER_BYTES = 1 << 16  # safetensors' JSON header, generously: six tensor entries


@dataclass(frozen=True)
class Head:
    """A loaded head: ``labels``, ``single_label`` (softmax) or not (sigmoid), the base it was trained on
    (``base``: its name; ``fingerprint``: its backbone's), and float32 ``tensors`` (head.safetensors)."""

    name: str
    path: str
    labels: tuple[str, ...]
    single_label: bool
    base: str
    fingerprint: str
    eps: float = 1e-12
    tensors: dict = field(default_factory=dict, repr=False)

    def __call__(self, pooled):
        """(B, D) float32 pooled embeddings of the base -> (B, num_labels) float32 raw logits."""
        import torch.nn.functional as F

        t = self.tensors
        standardized = (pooled - t["standardize.mean"]) / t["standardize.std"]  # what training saw
        normed = F.layer_norm(standardized, standardized.shape[-1:], t["classifier.layernorm.weight"],
                              t["classifier.layernorm.bias"], self.eps)
        return F.linear(normed, t["classifier.dense.weight"], t["classifier.dense.bias"])


def head_files(classifier: dict, mean: np.ndarray, std: np.ndarray, labels: tuple[str, ...], multi_label: bool,
               eps: float, base: str, fingerprint: str) -> tuple[dict, bytes]:
    """(``head.json`` contents, ``head.safetensors`` bytes) of a trained head. ``classifier``: its state
    (``layernorm.*``, ``dense.*``); ``mean``/``std``: the (D,) standardization training applied."""
    import torch
    from safetensors.torch import save

    tensors = {f"classifier.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in classifier.items()}
    tensors["standardize.mean"] = torch.from_numpy(np.asarray(mean, dtype=np.float32)).contiguous()
    tensors["standardize.std"] = torch.from_numpy(np.asarray(std, dtype=np.float32)).contiguous()
    config = {"format": FORMAT, "version": VERSION, "labels": list(labels),
              "problem_type": MULTI if multi_label else SINGLE, "hidden_size": int(mean.shape[0]),
              "layer_norm_eps": eps, "base": {"model": base, "backbone_sha256": fingerprint}}
    return config, save(tensors, metadata={"format": "pt"})


def read_heads(paths, base_head: bool = True) -> list[Head]:
    """``read_head`` of each folder (a ``Head`` already read is taken as it is; one path alone is one head, not its
    characters; None: no head); two heads of one name, or no labels at all (no heads and no ``base_head``), are a
    UsageError."""
    if isinstance(paths, (str, os.PathLike, Head)):
        paths = [paths]
    heads = [path if isinstance(path, Head) else read_head(os.fspath(path)) for path in paths or ()]
    if not heads and not base_head:
        raise UsageError("without the model's own labels there is nothing to report: give a head", option="base_head")
    names = [head.name for head in heads]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"two heads are named {twice[0]!r}: rename a folder, or set \"name\" in its {HEAD_CONFIG}",
                         option="heads")
    return heads


def read_head(path: str) -> Head:
    """The head in folder ``path``, every field and tensor checked (sizes before anything is allocated);
    ``HeadError`` (missing, not_a_head, corrupt) otherwise. Needs no base model."""
    folder = Path(path)
    if not folder.is_dir():
        raise HeadError(f"no such head folder: {path}", path=path, problem="missing")
    if not (folder / HEAD_CONFIG).is_file():
        raise HeadError(f"{path} is not a head (it has no {HEAD_CONFIG})", path=path, problem="not_a_head")
    try:
        config = _config(read_json(folder / HEAD_CONFIG))
    except CheckpointError as exc:
        raise HeadError(str(exc), path=path, problem="corrupt") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadError(f"{folder / HEAD_CONFIG}: {exc}", path=path, problem="corrupt") from None
    labels, hidden = config["labels"], config["hidden_size"]
    tensors = _tensors(folder / HEAD_WEIGHTS, {
        "standardize.mean": (hidden,), "standardize.std": (hidden,), "classifier.layernorm.weight": (hidden,),
        "classifier.layernorm.bias": (hidden,), "classifier.dense.weight": (len(labels), hidden),
        "classifier.dense.bias": (len(labels),)})
    name = config.get("name") or folder.resolve().name
    if not good_name(name):  # a folder's name, unchecked so far: it names every label of this head in the outputs
        raise HeadError(f"{path}: the folder's name {name!r} cannot name a head ({NAME_RULE}): set \"name\" in its "
                        f"{HEAD_CONFIG}", path=path, problem="corrupt")
    return Head(name, str(folder), labels, config["problem_type"] == SINGLE,
                config["base"]["model"], config["base"]["backbone_sha256"], config["layer_norm_eps"], tensors)


def good_name(name) -> bool:
    """Whether ``name`` can name a head: outputs write its labels as ``head:label`` (Audacity, Raven, --include),
    so a colon would make that ambiguous, and a control character would break a line of them."""
    return isinstance(name, str) and bool(name.strip()) and name.isprintable() and ":" not in name and len(name) <= 200


def good_label(label) -> bool:
    """Whether ``label`` can be one of a head's labels: a printable name, not blank (a tab or a newline would break
    the lines and rows outputs write)."""
    return isinstance(label, str) and bool(label.strip()) and label.isprintable()


def _config(raw: dict) -> dict:
    """``head.json`` checked: a KeyError/TypeError/ValueError names what is wrong."""
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} {FORMAT} file")
    labels, hidden, name = raw["labels"], raw["hidden_size"], raw.get("name")
    if not isinstance(labels, list) or not 0 < len(labels) <= MAX_LABELS or not all(map(good_label, labels)):
        raise ValueError(f"labels must be a list of 1 to {MAX_LABELS} printable names")
    if len(set(labels)) < len(labels):  # thresholds, --include and search find a label by its name
        raise ValueError("labels must be distinct")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden_size must be a whole number from 1 to {MAX_HIDDEN}")
    if raw["problem_type"] not in (SINGLE, MULTI):
        raise ValueError(f"problem_type must be {SINGLE} or {MULTI}")
    if name is not None and not good_name(name):
        raise ValueError(f"name must be {NAME_RULE}")
    if not isinstance(raw["base"], dict) or not all(isinstance(raw["base"].get(k), str)
                                                    for k in ("model", "backbone_sha256")):
        raise ValueError("base must name its model and backbone_sha256")
    eps = raw.get("layer_norm_eps", 1e-12)
    # NaN scored every file NaN; an int (1) is a number too, one too large for a float is not
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= sys.float_info.max:
        raise ValueError("layer_norm_eps must be a number above 0")
    return {**raw, "labels": tuple(labels), "layer_norm_eps": float(eps)}


def _tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The float32 tensors of ``head.safetensors``, exactly the keys and shapes of ``shapes``; the file's size is
    checked against them before it is read."""
    import torch

    from .weights import read_state_dict

    expected = 4 * sum(int(np.prod(shape)) for shape in shapes.values())
    try:
        size = path.stat().st_size
    except OSError:
        raise HeadError(f"{path.parent} has no readable {HEAD_WEIGHTS}", path=str(path.parent),
                        problem="corrupt") from None
    if size > expected + HEADER_BYTES:
        raise HeadError(f"{path} ({size:,} bytes) is larger than its head.json's shapes allow", path=str(path.parent),
                        problem="corrupt")
    try:
        state = read_state_dict(path)
    except CheckpointError as exc:
        raise HeadError(str(exc), path=str(path.parent), problem="corrupt") from None
    wrong = sorted(set(state) ^ set(shapes)) or [k for k in shapes if tuple(state[k].shape) != shapes[k]]
    if wrong or not all(t.is_floating_point() for t in state.values()):
        raise HeadError(f"{path} does not fit its {HEAD_CONFIG} (e.g. {wrong[0] if wrong else 'dtype'})",
                        path=str(path.parent), problem="corrupt")
    tensors = {k: v.to(torch.float32) for k, v in state.items()}
    # training writes finite weights and a std > 0: anything else scores NaN (which search ranked as 1.0)
    if not all(torch.isfinite(t).all() for t in tensors.values()) or not (tensors["standardize.std"] > 0).all():
        raise HeadError(f"{path} holds non-finite weights or a standard deviation <= 0", path=str(path.parent),
                        problem="corrupt")
    return tensors


def weights_stamp(model: str, path, heads=()) -> str | None:
    """What a local model's weights file (``path``: ``model`` resolved), each head's two files and the model
    folder's configs are now, as ``size:mtime_ns`` (a stat, not a hash: every run pays it): records and
    extracted features carry it, so that
    ``--resume``, ``--output-dir`` and ``extract-features`` refuse to mix outputs of a model or head retrained or
    replaced in place. A hub model is left out: its commit already names it."""
    from .names import CONFIG_NAME, PREPROCESSOR_NAME, looks_local, weights_path

    files = [os.path.join(head.path, name) for head in heads for name in (HEAD_CONFIG, HEAD_WEIGHTS)]
    if looks_local(model) and not os.path.isdir(weights_path(path)):  # a folder with no weights: none to stamp
        files.insert(0, weights_path(path))
    if looks_local(model) and os.path.isdir(path):  # its configs too (a new mean/std makes other numbers), last:
        files += [file for file in (os.path.join(path, name) for name in (CONFIG_NAME, PREPROCESSOR_NAME))
                  if os.path.isfile(file)]  # an earlier stamp without them is then a prefix of this one
    stats = [os.stat(file) for file in files]
    return " ".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats) or None


def check_bases(heads: list[Head], fingerprint: str, model: str, hidden_size: int | None = None) -> None:
    """``HeadError(other_base)`` for the first head not trained on the model whose backbone has ``fingerprint``;
    ``HeadError(corrupt)`` for one whose embedding width is not the model's ``hidden_size`` (a head.json that lies
    about its base: every window failed with a shape error)."""
    for head in heads:
        if head.fingerprint != fingerprint:
            raise HeadError(f"head {head.path} was trained on another base model ({head.base}), not on {model}",
                            path=head.path, problem="other_base", base=head.base)
        width = head.tensors["standardize.mean"].shape[0]
        if hidden_size is not None and width != hidden_size:
            raise HeadError(f"head {head.path} takes {width}-wide embeddings, and {model} gives {hidden_size}",
                            path=head.path, problem="corrupt")
