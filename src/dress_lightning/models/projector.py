"""Projectors from vision features to the language model's embedding space, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
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


class ImagePositionEmbedding(nn.Module):
    """Adds a learned vector per image-token slot to the tower's tokens: tells the LM which grid cell a token is.

    A ViT's tokens carry their position (its own position embedding); a small CNN's last stage barely does
    (``probe-tower``'s ``cell_from_token``: a linear probe names the cell of 36% of the occupied cells' tokens
    of ``dress-tiny-rn``), and the LM's rotary positions are relative, so "top left" would have to be found from
    the distance between the question and the image. It sits before the projector, initialised at the scale of
    the tiny tower's features (their spread across images is 0.46 per channel), so position and content start
    on an equal footing: after the projector a zero-initialised one stayed at norm 0.2 beside image tokens of
    norm 20 and changed nothing. Whether it helps depends on the recipe (README, "Does the model see the image?").
    """

    def __init__(self, num_tokens: int, dim: int, init_std: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, dim) * init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.weight.to(tokens.dtype)  # (..., N, D) + (N, D)


def build_projector(name: str, vision_dim: int, text_dim: int, position_embedding_tokens: int = 0) -> nn.Module:
    """Build the projector registered under ``name`` mapping (..., N, vision_dim) -> (..., N, text_dim).

    ``position_embedding_tokens`` > 0 puts an :class:`ImagePositionEmbedding` for that many tokens before it.
    """
    if name not in PROJECTORS:
        raise ValueError(f"Unknown projector {name!r}; valid projectors: {', '.join(sorted(PROJECTORS))}.")
    projector = PROJECTORS[name](vision_dim, text_dim)
    if position_embedding_tokens:
        projector = nn.Sequential(ImagePositionEmbedding(position_embedding_tokens, vision_dim), projector)
    return projector
