"""The model and where it comes from, no audio decoding: the AST module (``model``), loading weights
(``weights``), the hub and its cache (``hub``) and the fast inference modes (``speed``).

Imports the base modules and ``audio`` (a checkpoint carries its ``FeatureConfig``).
"""
