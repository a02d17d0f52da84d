"""The model and where it comes from, no audio decoding: the AST module (``model``), loading weights
(``weights``), the hub and its cache (``hub``), the fast inference modes (``speed``; bf16 attention on AMX tiles:
``amx``) and the timing the benchmark and ``--fast`` share (``timing``).

Imports the base modules and ``audio`` (a checkpoint carries its ``FeatureConfig``).
"""
