"""Checkpoints on disk -> a ready ``AST`` model and its ``FeatureConfig``.

Accepts a directory in Hugging Face hub layout (``config.json``, ``preprocessor_config.json``,
``model.safetensors`` or ``pytorch_model.bin``) or a single weights file (HF key names, a bare ``ASTModel``'s
unprefixed ones, or the original YuanGongND/ast ``module.v.*`` naming; ``hf_names`` maps them). Loading is strict: any missing,
unexpected or mis-shaped key is an error that names it. Pickles are only ever opened with
``torch.load(weights_only=True)``; safetensors is preferred.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..constants import AUDIOSET_MAX_LENGTH, SPEECH_COMMANDS_MAX_LENGTH, SPEECH_COMMANDS_MEAN, SPEECH_COMMANDS_STD
from ..errors import CheckpointError
from ..audio.featureconfig import FeatureConfig
from .cache import verify_weights
# The hub's repository layout; names.py owns the names because it must stay importable without torch.
from .names import (CONFIG_NAME, PICKLE_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME, WEIGHT_SUFFIXES,  # noqa: F401
                    load_labels, read_json)
from .config import ASTConfig, AttnImplementation

if TYPE_CHECKING:  # the model code imports torch: taken where a model is built
    from .model import AST

PREFIX = "audio_spectrogram_transformer."


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to build a model: configs and a float state dict in HF naming."""

    config: ASTConfig
    features: FeatureConfig
    state_dict: dict
    source: str  # path it was read from, for messages


def read_configs(directory: Path, weights: Path | None = None) -> tuple[ASTConfig, FeatureConfig]:
    """``config.json`` (+ optional ``preprocessor_config.json``) of a hub-layout directory, every field checked
    before anything is allocated from it, and the size it describes against the weights file (``weights``, else
    the directory's own, when there is one)."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}", hint="is this an AST checkpoint directory?")
    raw = read_json(config_path)
    model_type = raw.get("model_type")
    if model_type not in (None, "audio-spectrogram-transformer"):
        raise CheckpointError(f"{config_path} describes a {model_type!r} model, not an Audio Spectrogram Transformer")
    try:
        config = ASTConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}", path=str(config_path)) from None
    _check_size(config, config_path, weights or _weights_file(directory))
    pre: dict[str, Any] = {"num_mel_bins": config.num_mel_bins, "max_length": config.max_length}
    pre_path = directory / PREPROCESSOR_NAME
    if pre_path.is_file():
        pre.update(read_json(pre_path))
    try:
        features = FeatureConfig.from_dict(pre)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{pre_path}: {exc}", path=str(pre_path)) from None
    if (features.max_length, features.num_mel_bins) != (config.max_length, config.num_mel_bins):
        raise CheckpointError(
            f"{directory}: preprocessor ({features.max_length} x {features.num_mel_bins}) and model "
            f"({config.max_length} x {config.num_mel_bins}) disagree on the input shape"
        )
    return config, features


def _weights_file(directory: Path) -> Path | None:
    return next((directory / name for name in (SAFETENSORS_NAME, PICKLE_NAME) if (directory / name).is_file()), None)


def _check_size(config: ASTConfig, config_path: Path, weights: Path | None) -> None:
    """The parameters ``config`` describes must fit in the weights file at 2 bytes each (float16, the smallest
    float a checkpoint holds): a config that asks for more cannot be the file's, and is refused before a model
    of its size is made."""
    if weights is None:
        return
    verify_weights(weights)  # a truncated download is named as such first (its header no longer reads)
    try:
        size = weights.stat().st_size
    except OSError:
        return  # reported when the weights are read
    if 2 * config.num_parameters > size:
        raise CheckpointError(
            f"{config_path}: hidden_size {config.hidden_size}, num_hidden_layers {config.num_hidden_layers}, "
            f"intermediate_size {config.intermediate_size}, {config.num_tokens} tokens and {config.num_labels} "
            f"labels make {config.num_parameters:,} parameters, more than {weights.name} ({size:,} bytes) holds",
            path=str(config_path))


def read_state_dict(path: Path) -> dict:
    """Tensors from a ``.safetensors`` file, or a pickle opened with ``weights_only=True``."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"corrupt or truncated weights file {path} ({_one_line(exc)})", path=str(path),
                                  corrupt=True) from None
    try:
        with warnings.catch_warnings():  # torch warns about a tampered file's pickle protocol: it is refused anyway
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # UnpicklingError, RuntimeError (zip), EOFError...: all mean unusable
        # torch's own message ends by suggesting weights_only=False, i.e. running the file's code: never echo it.
        raise CheckpointError(
            f"not a safe weights file: {path} (neither safetensors nor a PyTorch file of plain tensors)",
            path=str(path), hint="only safetensors files and tensor-only PyTorch checkpoints are loaded; "
                                 "nothing in a model file is ever executed",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return obj


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


_ORIGINAL_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def is_original_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("module.v.", "v.")) for k in state_dict)


def remap_original(state_dict: Mapping[str, Any]) -> dict:
    """Original YuanGongND/ast checkpoint (``module.v.*``, fused qkv) -> HF key names. Pure function.

    The unused ``v.head*`` (the ImageNet head of the DeiT backbone) is dropped; anything else that is not
    recognised is kept under its own name so that strict loading reports it.
    """
    out: dict = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith(("v.head.", "v.head_dist.")):
            continue
        if name.startswith("mlp_head."):
            index, param = name[len("mlp_head.") :].split(".", 1)
            out[{"0": "classifier.layernorm.", "1": "classifier.dense."}.get(index, name + ".") + param] = value
            continue
        if not name.startswith("v."):
            out[key] = value
            continue
        name = name[2:]
        emb = PREFIX + "embeddings."
        simple = {
            "cls_token": emb + "cls_token",
            "dist_token": emb + "distillation_token",
            "pos_embed": emb + "position_embeddings",
            "patch_embed.proj.weight": emb + "patch_embeddings.projection.weight",
            "patch_embed.proj.bias": emb + "patch_embeddings.projection.bias",
            "norm.weight": PREFIX + "layernorm.weight",
            "norm.bias": PREFIX + "layernorm.bias",
        }
        if name in simple:
            out[simple[name]] = value
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if not match:
            out[key] = value
            continue
        layer, module, param = match.groups()
        base = f"{PREFIX}encoder.layer.{layer}."
        if module == "attn.qkv":
            # Fused (3D, D) projection: rows [0:D] query, [D:2D] key, [2D:3D] value.
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}attention.attention.{part}.{param}"] = chunk.clone()
        elif module in _ORIGINAL_BLOCK:
            out[f"{base}{_ORIGINAL_BLOCK[module]}.{param}"] = value
        else:
            out[key] = value
    return out


ENCODER_PARTS = ("embeddings.", "encoder.", "layernorm.")  # transformers' ASTModel: the backbone, unprefixed


def hf_names(state_dict: Mapping[str, Any]) -> dict:
    """Any supported checkpoint's keys -> ``ASTForAudioClassification``'s. Pure function: the original repo's are
    remapped (``remap_original``), a bare encoder's (``ASTModel.save_pretrained``) prefixed with ``PREFIX``;
    anything else keeps its name, so that strict loading reports it."""
    if is_original_layout(state_dict):
        return remap_original(state_dict)
    if not any(k.startswith(PREFIX) for k in state_dict):
        return {PREFIX + k if k.startswith(ENCODER_PARTS) else k: v for k, v in state_dict.items()}
    return dict(state_dict)


HEAD_SIZE = 64  # width of one attention head in every published AST (768 = 12 x 64): not stored in the weights
NEEDS_CONFIG = "keep the weights file in a folder with its config.json"
LAYERS = PREFIX + "encoder.layer."
_LAYER_KEY = re.compile(re.escape(LAYERS) + r"(0|[1-9][0-9]{0,8})\.")  # as the model names them: ASCII, no 0 first


def encoder_layers(state_dict: Mapping[str, Any], source: str, expected: int | None = None) -> int:
    """How many encoder layers ``state_dict`` holds: they must be numbered 0 to n - 1, n the config's ``expected``
    (None: however many there are). Checked before a model is built from the count: a config's
    ``num_hidden_layers`` or one stray ``encoder.layer.1000000.*`` key made it build that many layers first."""
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, state_dict) if m}
    count = len(layers) if expected is None else expected
    if layers == set(range(count)):
        return count
    held = f"{len(layers)} encoder layers numbered {min(layers)} to {max(layers)}" if layers else "no encoder layers"
    reason = (f"the file holds {held}, not 0 to {count - 1}" if expected is None else
              f"its config asks for {count} encoder layers (numbered 0 to {count - 1}), the file holds {held}")
    raise CheckpointError(f"{source} does not fit the AST architecture: {reason}", path=source)


def check_dtypes(state_dict: Mapping[str, Any], source: str) -> None:
    """Every tensor is a real floating-point one: an integer or bool one cannot become a parameter, and a
    complex one would lose its imaginary part."""
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"{source}: tensor {name} is {dtype}, expected a floating-point tensor",
                                  path=source)


def infer_config(state_dict: Mapping[str, Any], source: str) -> tuple[ASTConfig, FeatureConfig]:
    """Architecture of a bare weights file (no config.json), from tensor shapes.

    The stride is not stored anywhere, so it is found from the number of position embeddings, trying the
    published input shapes (128 mel bins, 1024 or 128 frames) and strides 10 to 16. Neither is the head count:
    it is found only for widths that are a multiple of ``HEAD_SIZE``, as every published AST's.
    """
    try:
        pos = state_dict[PREFIX + "embeddings.position_embeddings"]
        hidden, tokens = int(pos.shape[-1]), int(pos.shape[1])
        inner = int(state_dict[PREFIX + "encoder.layer.0.intermediate.dense.weight"].shape[0])
        head = state_dict.get("classifier.dense.weight")
        num_labels = 0 if head is None else int(head.shape[0])
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an AST state dict (missing {exc})", path=source) from None
    except IndexError:  # a 0-d tensor where a matrix belongs
        raise CheckpointError(f"{source}: not an AST state dict (a tensor with too few dimensions)",
                              path=source) from None
    layers = encoder_layers(state_dict, source)
    if hidden % HEAD_SIZE:
        raise CheckpointError(f"{source}: the number of attention heads of a {hidden}-wide model is not stored in "
                              "its weights", path=source, hint=NEEDS_CONFIG)
    labels: tuple[str, ...] = ()
    if num_labels == 527:
        labels = load_labels("audioset")
    elif num_labels == 35:
        labels = load_labels("speechcommands")
    elif num_labels:
        labels = tuple(f"LABEL_{i}" for i in range(num_labels))
    for max_length in (AUDIOSET_MAX_LENGTH, SPEECH_COMMANDS_MAX_LENGTH, 512, 256):
        for stride in range(10, 17):
            cfg = ASTConfig(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_SIZE),
                intermediate_size=inner, frequency_stride=stride, time_stride=stride,
                max_length=max_length, id2label=labels,
            )
            if cfg.num_tokens == tokens:
                try:
                    cfg.check()
                except ValueError as exc:
                    raise CheckpointError(f"{source}: {exc}", path=source) from None
                features = FeatureConfig(max_length=max_length)
                if num_labels == 35:  # speech-commands normalization
                    features = replace(features, mean=SPEECH_COMMANDS_MEAN, std=SPEECH_COMMANDS_STD)
                return cfg, features
    raise CheckpointError(f"{source}: cannot infer the input shape from {tokens} position embeddings",
                          path=source, hint=NEEDS_CONFIG)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a hub-layout directory or a single weights file (with an optional config.json beside it), and check
    all of it that needs no model (sizes, dtypes, names and shapes) before one is built."""
    path = Path(path)
    if path.is_dir():
        configs = read_configs(path)
        weights = _weights_file(path)
        if weights is None:
            raise CheckpointError(
                f"{path} has no {SAFETENSORS_NAME} or {PICKLE_NAME}", path=str(path),
                hint=f"a checkpoint directory holds {CONFIG_NAME}, {PREPROCESSOR_NAME} and {SAFETENSORS_NAME}",
            )
        return _checked(hf_names(read_state_dict(weights)), configs, str(weights))
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}", path=str(path))
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path} is not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)}, "
                              "or a checkpoint directory)", path=str(path))
    configs = read_configs(path.parent, path) if (path.parent / CONFIG_NAME).is_file() else None
    return _checked(hf_names(read_state_dict(path)), configs, str(path))


def _checked(state_dict: dict, configs: tuple[ASTConfig, FeatureConfig] | None, source: str) -> Checkpoint:
    check_dtypes(state_dict, source)
    config, features = configs or infer_config(state_dict, source)
    check_state_dict(config, state_dict, source)
    return Checkpoint(config, features, state_dict, source)


def _template(config: ASTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of a one-layer model of ``config``, built on the meta device (no memory):
    what a checkpoint of ``config`` must hold, with the names of layer 0 standing for every layer's."""
    import torch

    from .model import AST

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AST(replace(config, num_hidden_layers=1)).state_dict().items()}


def _template_name(name: str) -> str:
    """A layer's key -> layer 0's (``..layer.7.x`` -> ``..layer.0.x``); any other name as it is."""
    match = _LAYER_KEY.match(name)
    return f"{LAYERS}0.{name[match.end():]}" if match else name


def _expected_names(template: Mapping[str, Any], layers: int) -> Iterator[str]:
    """Every parameter name of a model of ``layers`` layers, in the model's order, one at a time."""
    first = True
    for name in template:
        if not name.startswith(LAYERS):
            yield name
        elif first:  # every layer's names, once, where the first layer's stand
            first = False
            per_layer = [k[len(LAYERS) + 2:] for k in template if k.startswith(LAYERS)]  # "0." dropped
            yield from (f"{LAYERS}{i}.{k}" for i in range(layers) for k in per_layer)


def check_state_dict(config: ASTConfig, state_dict: Mapping[str, Any], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped keys, before a model of ``config``
    is built: its layers first (``encoder_layers``); then each key against the one-layer ``_template``, so that
    the work is bounded by the file's keys, whatever the config asks for."""
    layers = encoder_layers(state_dict, source, config.num_hidden_layers)
    template = _template(config)
    names = {k: _template_name(k) for k in state_dict}
    unexpected = [k for k, name in names.items() if name not in template]
    shapes = [f"{k} {tuple(state_dict[k].shape)} != {template[name]}" for k, name in names.items()
              if name in template and tuple(state_dict[k].shape) != template[name]]
    per_layer = sum(k.startswith(LAYERS) for k in template)
    missing_count = len(template) + (layers - 1) * per_layer - (len(state_dict) - len(unexpected))
    absent = (k for k in _expected_names(template, layers) if k not in state_dict)
    missing = list(islice(absent, 3)) if missing_count else []
    problems = []
    if missing:
        problems.append(f"{missing_count} missing (e.g. {', '.join(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} with wrong shape (e.g. {shapes[0]})")
    if problems:
        raise CheckpointError(f"{source} does not fit the AST architecture: " + "; ".join(problems))


def weights_fingerprint(state_dict: Mapping[str, Any], prefix: str = "") -> str:
    """A sha256 over every tensor (whose name starts with ``prefix``) in order: its name, shape, dtype and an
    evenly strided sample of up to 4096 of its values.

    Hashing all 344 MB of an AudioSet AST would cost more than loading it; any two real checkpoints differ in
    the sampled values of every tensor trained (fine-tuning moves every weight), which is all a cache key and a
    head's reference to its base need: they tell models apart, they are no defence against forgery."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        if not name.startswith(prefix):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def backbone_fingerprint(model: AST) -> str:
    """``weights_fingerprint`` of the backbone alone (not the classifier) of a float32 model as ``build_model``
    makes it: what a head trained on this model's pooled embeddings is bound to."""
    return weights_fingerprint(model.state_dict(), PREFIX)


def build_model(checkpoint: Checkpoint, attn: AttnImplementation = "sdpa") -> AST:
    """A float32 model in eval mode holding the checkpoint's weights (strictly checked)."""
    import torch

    from .model import AST

    check_state_dict(checkpoint.config, checkpoint.state_dict, checkpoint.source)
    with torch.device("meta"):
        model = AST(checkpoint.config, attn=attn)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
