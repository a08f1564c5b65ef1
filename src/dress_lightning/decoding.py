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


@dataclass
class Decoding:
    """How answers are decoded in a conversation (greedy by default, as ``evaluate`` does)."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    """0: greedy; above 0: sampling at this temperature (nucleus ``top_p``)."""
    top_p: float = 1.0
