"""ast-cli: audio tagging with the Audio Spectrogram Transformer.

The Python API, in the spirit of whisper's ``load_model`` + ``transcribe``::

    from ast_cli import Tagger
    tagger = Tagger.load("audioset-10-10-0.4593")          # alias, hub id, directory or weights file
    for result in tagger.classify(["song.wav", "talk.flac"]):
        print(result.path, [(x.label, round(x.score, 3)) for x in result.labels])

Everything heavy (torch) is imported on first use of these names, so ``import ast_cli`` stays instant.

Layers, lowest first; a module imports only from its own layer or the layers below it (tests/test_layout.py
reads every import and holds the code to this):

1. ``constants``, ``errors``: plain values and the exception types; import nothing of ours.
2. ``audio``: decoding, resampling, log-mel features, audio sources, input paths. No model.
3. ``checkpoint``: the AST model, weights, the hub and its cache, fast inference modes. No audio decoding.
4. ``run``: options, backends, the engine, the Tagger, outputs, resume. No command line.
5. ``tasks``: extract, train/evaluate, listen, benchmark, the Ray runner: each a use of the layers below.
6. ``cli``: the ``ast`` command, glue over everything above; the only place that speaks in flags.
"""

from __future__ import annotations

from .constants import DEFAULT_MODEL

__version__ = "0.1.0"

# Public names -> the module that defines them; loaded lazily (PEP 562).
_LAZY = {
    "Tagger": "run.tagger", "FileResult": "run.tagger", "LabelScore": "run.tagger", "LabelSelection": "run.tagger",
    "Segment": "run.tagger", "RunOptions": "run.options", "Engine": "run.engine", "FileOutput": "run.engine",
    "ArraySource": "audio.sources", "FileSource": "audio.sources", "StreamSource": "audio.sources",
    "AudioSource": "audio.sources",
    "LocalBackend": "run.backends", "Backend": "run.backends", "FeatureExtractor": "tasks.extract", "Index": "tasks.index",
    "AstError": "errors", "AudioDecodeError": "errors", "CheckpointError": "errors", "HubError": "errors",
    "HeadError": "errors",
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
