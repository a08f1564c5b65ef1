"""Projectors from vision features to the language model's embedding space, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _linear(vision_dim: int, text_dim: int) -> nn.Module:
    # DRESS (and LLaVA-1.0): a single linear map.
    return nn.Linear(vision_dim, text_dim)


def _mlp2x_gelu(vision_dim: int, text_dim: int) -> nn.Module:
    # LLaVA-1.5: Linear -> GELU -> Linear.
    return nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": _linear,
    "mlp2x_gelu": _mlp2x_gelu,
}


def build_projector(name: str, vision_dim: int, text_dim: int) -> nn.Module:
    """Build the projector registered under ``name`` mapping (..., vision_dim) -> (..., text_dim)."""
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; valid projectors: {', '.join(sorted(PROJECTORS))}.")
    return PROJECTORS[name](vision_dim, text_dim)
