"""ast-cli: audio tagging with the Audio Spectrogram Transformer."""

__version__ = "0.1.0"
DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
