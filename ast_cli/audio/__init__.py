"""Audio in, no model: decoding (``decode``), resampling (``resample``), the log-mel front end (``features``),
sources of audio blocks (``sources``) and the expansion of input paths (``inputs``).

Imports only the base modules (``constants``, ``errors``).
"""
