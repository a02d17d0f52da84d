"""Model names -> local checkpoint paths: local files and directories, or hub repos in the HF cache.

(Aliases, downloading and the friendly hub errors live here too; see issue #3.)
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .weights import WEIGHT_SUFFIXES

# What inference needs from a hub repo; pytorch_model.bin only when there is no safetensors.
INFERENCE_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def looks_local(name: str) -> bool:
    """A path the user means as a file or directory (exists, or is spelled like a path)."""
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.endswith(WEIGHT_SUFFIXES)
        or os.sep in name.strip("/").replace("/", "", 1)  # more than one slash: not ORG/NAME
    )


def resolve_model(name: str, *, offline: bool | None = None, cache_dir: str | None = None) -> Path:
    """Local checkpoint path for ``name`` (a local path, or a hub id already in the cache)."""
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no such model file or directory: {name}")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=list(INFERENCE_FILES) + ["pytorch_model.bin"]))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"model {name!r} is not in the Hugging Face cache",
            hint=f"run `ast download {name}` where the hub is reachable",
        ) from None
