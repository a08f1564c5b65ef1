"""The "3H" aspects that feedback scores: helpfulness, honesty, harmlessness (DESIGN.md s.1).

A leaf module: the condition text, the shard schema, the judges and the metrics all name the
aspects, so this imports nothing from the package and sits below every layer.
"""

from __future__ import annotations

from typing import Literal

Aspect = Literal["helpfulness", "honesty", "harmlessness"]

ASPECTS: tuple[Aspect, ...] = ("helpfulness", "honesty", "harmlessness")
"""The aspects a feedback entry may score, in the order critiques, conditions and reports list them."""
