"""What ``ast train`` writes and how it resumes: the saved checkpoint, the per-epoch state, the output
folder's marker, and the staging folder swapped into place so that ``out`` is never half written.
"""


from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import OutputWriteError, UsageError
from .metrics import _jsonable
from .train_data import MULTI, SINGLE


def save_checkpoint(out: str, model, features, base_source: str, multi_label: bool) -> None:
    from safetensors.torch import save

    from ..checkpoint.names import CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME
    from ..run.files import atomic_write

    base_dir = base_source if os.path.isdir(base_source) else os.path.dirname(base_source)
    raw: dict = {}
    if os.path.isfile(os.path.join(base_dir, CONFIG_NAME)):
        with open(os.path.join(base_dir, CONFIG_NAME), encoding="utf-8") as handle:
            raw = json.load(handle)
    cfg = model.config
    raw.update({field: getattr(cfg, field) for field in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "intermediate_size", "layer_norm_eps", "patch_size",
                                                         "frequency_stride", "time_stride", "max_length",
                                                         "num_mel_bins", "hidden_act", "qkv_bias")})
    raw.update(model_type="audio-spectrogram-transformer", architectures=["ASTForAudioClassification"],
               id2label={str(i): name for i, name in enumerate(cfg.id2label)},
               label2id={name: i for i, name in enumerate(cfg.id2label)},
               problem_type=MULTI if multi_label else SINGLE)
    raw.pop("num_labels", None)
    preprocessor = {"feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "padding_side": "right",
                    "padding_value": 0.0, "return_attention_mask": False, "do_normalize": features.do_normalize,
                    "max_length": features.max_length, "num_mel_bins": features.num_mel_bins,
                    "mean": float(features.mean), "std": float(features.std), "sampling_rate": features.sampling_rate}
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with _writing(os.path.join(out, SAFETENSORS_NAME)) as path, atomic_write(path, "wb") as handle:
        handle.write(save(state, metadata={"format": "pt"}))
    _write_json(os.path.join(out, CONFIG_NAME), raw)
    _write_json(os.path.join(out, PREPROCESSOR_NAME), preprocessor)


def save_head(out: str, model, mean, std, multi_label: bool, base: tuple[str, str], fingerprint: str) -> None:
    """``head.json`` and ``head.safetensors`` (``checkpoint.heads``) of a head-mode ``model`` trained on
    embeddings standardized by (D,) ``mean``/``std``, from the base ``base`` (its name as given, its local path)
    whose backbone has ``fingerprint``."""
    from ..checkpoint.heads import HEAD_CONFIG, HEAD_WEIGHTS, head_files
    from ..checkpoint.names import model_identity
    from ..run.files import atomic_write

    config, weights = head_files(model.classifier.state_dict(), mean, std, model.config.id2label, multi_label,
                                 model.config.layer_norm_eps, model_identity(*base), fingerprint)
    with _writing(os.path.join(out, HEAD_WEIGHTS)) as path, atomic_write(path, "wb") as handle:
        handle.write(weights)
    _write_json(os.path.join(out, HEAD_CONFIG), config)


@dataclass
class _TrainState:
    epoch: int = 0
    best_epoch: int = 0
    best_loss: float = float("inf")
    best_metrics: dict = field(default_factory=dict)
    best_weights: dict | None = None


def _state_dir(out: str) -> str:
    return os.path.join(out, "checkpoint")


def _save_state(out, model, optimizer, schedule, state: _TrainState) -> None:
    """The last epoch's weights and optimizer state, and the best epoch's weights (when another), for
    ``--resume`` (plain tensors: loadable with ``weights_only=True``)."""
    import torch

    directory = _state_dir(out)
    os.makedirs(directory, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
               "epoch": state.epoch, "best_epoch": state.best_epoch, "best_loss": state.best_loss,
               "best_metrics": json.dumps(_jsonable(state.best_metrics))}
    if state.best_weights is not None and state.best_epoch != state.epoch:
        payload["best_model"] = state.best_weights
    path = os.path.join(directory, "trainer_state.pt")
    try:
        torch.save(payload, path + ".part")
        os.replace(path + ".part", path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        with suppress(OSError):
            os.unlink(path + ".part")
        reason = getattr(exc, "strerror", None) or _first_line(exc)
        raise OutputWriteError(f"cannot write {path}: {reason}", path=path) from None


def _load_state(out, model, optimizer, schedule) -> _TrainState:
    import torch

    from ..errors import CheckpointError

    path = os.path.join(_state_dir(out), "trainer_state.pt")
    try:
        with warnings.catch_warnings():  # torch warns about a tampered file's pickle protocol: it is refused anyway
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        schedule.load_state_dict(payload["schedule"])
        state = _TrainState(int(payload["epoch"]), int(payload["best_epoch"]), float(payload["best_loss"]),
                            json.loads(payload["best_metrics"]))
        best = payload.get("best_model", payload["model"])
        state.best_weights = {k: v.detach().cpu().clone() for k, v in best.items()}
    except Exception:  # UnpicklingError, a missing key, a wrong shape: all mean unusable
        # torch's own message ends by suggesting weights_only=False, i.e. running the file's code: never echo it.
        raise CheckpointError(f"not a safe training state file: {path} (not a PyTorch file of plain tensors "
                              "written by this training run)", path=path,
                              hint="nothing in a model file is ever executed; train again without resuming") from None
    return state


MARKER = ".ast-train.json"  # in every folder ast train writes: what makes it "an ast training output"
STAGING_SUFFIX = ".ast-train"


def staging_dir(out: str) -> str:
    """The folder a run works in, beside ``out`` (through a symlink: beside its target), renamed to ``out``
    when it is done."""
    out = os.path.realpath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}{STAGING_SUFFIX}")


def read_marker(folder: str) -> dict | None:
    """The marker of an ast training output in ``folder``, or None when it is not one."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_out(out: str, *, overwrite: bool, resume: bool, marker: dict) -> None:
    """Before any work: ``out`` is absent, empty, or an ast training output that ``overwrite`` replaces or
    ``resume`` continues (with the same mode, labels and base as ``marker``)."""
    from ..run.files import check_writable_dir

    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} exists and is not a folder", option="out")
    check_writable_dir(os.path.dirname(os.path.abspath(out)), option="out")
    if not os.path.isdir(out) or not os.listdir(out):
        if resume and _state_time(staging_dir(out)) == 0:
            raise UsageError(f"nothing to resume in {out} (no checkpoint/trainer_state.pt)", option="resume")
        return _check_resumable(staging_dir(out), marker) if resume else None
    found = read_marker(out)
    if found is None:
        raise UsageError(f"{out} is not empty and is not an ast training output: nothing in it is replaced",
                         option="out", hint="choose a new or empty folder")
    if resume:
        return _check_resumable(out if _state_time(out) >= _state_time(staging_dir(out)) else staging_dir(out),
                                marker)
    if not overwrite:
        raise UsageError(f"{out} already holds a training run", option="out", suggest={"overwrite": True})


def _check_resumable(folder: str, marker: dict) -> None:
    found = read_marker(folder) or {}
    if _state_time(folder) == 0:
        raise UsageError(f"nothing to resume in {folder} (no checkpoint/trainer_state.pt)", option="resume")
    for key in ("mode", "multi_label", "labels"):
        if found.get(key) != marker[key]:
            raise UsageError(f"cannot resume {folder}: its {key} {found.get(key)!r} differ(s) from this run's "
                             f"{marker[key]!r}", option="resume", hint="train into a new folder instead")
    if found.get("base", marker.get("base")) != marker.get("base"):  # recorded since s8: older runs resume as before
        raise UsageError(f"cannot resume {folder}: it was trained from {found['base']}, not {marker['base']}",
                         option="model", suggest={"model": found["base"]})


def _state_time(folder: str) -> float:
    """When ``folder``'s training state was saved (0: none)."""
    try:
        return os.stat(os.path.join(_state_dir(folder), "trainer_state.pt")).st_mtime_ns
    except OSError:
        return 0


def prepare_work(out: str, resume: bool, marker: dict) -> None:
    """A fresh ``staging_dir(out)``, or for ``resume`` the newer of it (an interrupted run) and ``out``."""
    import shutil

    work = staging_dir(out)
    if resume and _state_time(work) > _state_time(out):
        return
    shutil.rmtree(work, ignore_errors=True)  # ours by name: left by a run that was killed
    if resume:
        shutil.copytree(out, work, copy_function=_link_or_copy, symlinks=True)
    else:
        os.makedirs(work)
    _write_json(os.path.join(work, MARKER), marker)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link for files that are only ever replaced; a copy of the log, which is appended to."""
    import shutil

    if not source.endswith(".jsonl"):
        try:
            return os.link(source, target)
        except OSError:
            pass
    shutil.copy2(source, target)


def _swap_into_place(work: str, out: str) -> None:
    """Rename the finished ``work`` folder to ``out``: one rename when ``out`` is absent or empty; else an
    atomic exchange (Linux), or two renames elsewhere; then the previous output is removed."""
    import errno
    import shutil

    try:
        os.rename(work, out)  # replaces an empty folder too
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputWriteError(f"cannot move {work} to {out}: {exc.strerror or exc}", path=out) from None
    if not _exchange(work, out):
        old = work + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(work, out)
        work = old
    shutil.rmtree(work, ignore_errors=True)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


@contextmanager
def _writing(path: str) -> Iterator[str]:
    """Name ``path`` in the error when writing it fails (a full disk names no file by itself)."""
    try:
        yield path
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}", path=path) from None


def _write_json(path: str, data) -> None:
    from ..run.files import atomic_write

    with _writing(path), atomic_write(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _trim_log(path: str, epochs: int) -> None:
    """Keep the log's records of the first ``epochs`` epochs (and drop a torn last line)."""
    from ..run.files import atomic_write

    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if kept != lines:
        with _writing(path), atomic_write(path) as handle:
            handle.write("".join(line + "\n" for line in kept))


def _append_line(path: str, line: str) -> None:
    with _writing(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
