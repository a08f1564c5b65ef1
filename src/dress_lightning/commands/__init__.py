"""The project's commands (``data``, ``feedback rollout``, ``evaluate``, ``probe-tower``) over the library below.

Each module parses its options without importing torch (``--help`` is instant) and calls library
functions: the data writers, the rollout engine (``feedback/``), the evaluation runner
(``evaluation/``). ``jobs`` is the setup the predict-loop jobs share. The stage graph
(``stages.py``) runs the same functions in-process.
"""
