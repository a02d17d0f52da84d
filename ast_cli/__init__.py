"""ast-cli: audio tagging with the Audio Spectrogram Transformer.

The Python API, in the spirit of whisper's ``load_model`` + ``transcribe``::

    from ast_cli import Tagger
    tagger = Tagger.load("audioset-10-10-0.4593")          # alias, hub id, directory or weights file
    for result in tagger.classify(["song.wav", "talk.flac"]):
        print(result.path, [(x.label, round(x.score, 3)) for x in result.labels])

Everything heavy (torch) is imported on first use of these names, so ``import ast_cli`` stays instant.
"""

from __future__ import annotations

from .constants import DEFAULT_MODEL

__version__ = "0.1.0"

# Public names -> the module that defines them; loaded lazily (PEP 562).
_LAZY = {
    "Tagger": "tagger", "FileResult": "tagger", "LabelScore": "tagger", "LabelSelection": "tagger",
    "Segment": "tagger", "RunOptions": "options", "Engine": "engine", "FileOutput": "engine",
    "ArraySource": "sources", "FileSource": "sources", "StreamSource": "sources", "AudioSource": "sources",
    "LocalBackend": "backends", "Backend": "backends", "FeatureExtractor": "extract",
    "AstError": "errors", "AudioDecodeError": "errors", "CheckpointError": "errors", "HubError": "errors",
    "ModelNotFoundError": "errors", "UsageError": "errors",
}

__all__ = ["DEFAULT_MODEL", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
