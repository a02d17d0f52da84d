"""Uses of the layers below, one module each: feature extraction (``extract``), fine-tuning and evaluation
(``train``), live listening (``listen``), speed measurement (``benchmark``) and running classify or extract on a
Ray cluster (``distributed``).

Imports the base modules, ``audio``, ``checkpoint`` and ``run``; never ``cli``.
"""
