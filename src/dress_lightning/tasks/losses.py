"""Pure loss functions (no Lightning), tested alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dress_lightning.conversation import IGNORE_INDEX


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``.

    logits (B, T, V) predict token t+1 at position t; labels (B, T) are the input ids with
    everything but the trained response tokens set to ``IGNORE_INDEX``.
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    shifted_labels = labels[:, 1:]  # (B, T-1)
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("Batch has no labelled token: every sample was fully masked (check the label masks).")
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
