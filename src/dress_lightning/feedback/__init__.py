"""NLF data engine: judges (annotation, LLM), their prompts and on-disk cache, rollouts and refinement.

Import the submodules directly (``dress_lightning.feedback.judges``...); this package imports
nothing, so the light modules (judges, findings, reading, annotation_judge, synonyms) stay free of torch
and httpx.
"""
