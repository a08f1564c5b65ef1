"""How generating jobs decode: ``GenerationSettings`` for ``generate``, rollouts and evaluation; ``Decoding`` for a chat.

Kept free of torch so that the commands that configure it answer ``--help`` without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """Decoding for ``predict`` and rollouts (recorded as provenance in everything generated)."""

    max_new_tokens: int = 96
    """Longest response in tokens."""
    do_sample: bool = False
    """Sample (True) or greedy decode (False)."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    num_samples: int = 1
    """Responses per prompt (rollouts sample several)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance (Sanchez et al. 2023): next-token logits ``l_u + g * (l_c - l_u)`` of the
    conditioned prompt (``l_c``) and the same prompt under ``negative_condition`` (``l_u``); 1: plain decoding."""
    negative_condition: str = "none"
    """The condition of the guidance's second pass: ``none`` (no condition), ``low`` or the text itself."""


@dataclass
class Decoding:
    """How answers are decoded in a conversation (greedy by default, as ``evaluate`` does)."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    """0: greedy; above 0: sampling at this temperature (nucleus ``top_p``)."""
    top_p: float = 1.0
    guidance_scale: float = 1.0
    """Classifier-free guidance as in ``GenerationSettings``: 1 decodes from the condition alone."""
    negative_condition: str = "none"
    """The condition guidance steers away from: ``none``, ``low`` or the text itself."""
