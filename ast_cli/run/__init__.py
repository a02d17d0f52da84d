"""Running the model over audio, no command line: the options bundle (``options``), backends that run a batch
(``backends``), the engine that joins sources and a backend (``engine``), the ``Tagger`` (``tagger``), outputs
(``output``) and resuming from them (``resume``).

Imports the base modules, ``audio`` and ``checkpoint``.
"""
