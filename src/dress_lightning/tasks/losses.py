"""Pure loss functions (no Lightning), tested alone."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dress_lightning.conversation import IGNORE_INDEX


def _check_labelled(shifted_labels: torch.Tensor) -> None:
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("Batch has no labelled token: every sample was fully masked (check the label masks).")


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``.

    logits (B, T, V) predict token t+1 at position t; labels (B, T) are the input ids with
    everything but the trained response tokens set to ``IGNORE_INDEX``.
    """
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    shifted_labels = labels[:, 1:]  # (B, T-1)
    _check_labelled(shifted_labels)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions t whose next token t+1 is labelled, the only logits the loss needs."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def selected_lm_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``masked_lm_loss`` from logits (M, V) computed only at the M ``predicting_positions`` (row-major order).

    Same value as the full loss; the LM head and the softmax skip image, prompt and padding positions
    (Hugging Face causal LMs take the mask as ``logits_to_keep``).
    """
    _check_labelled(labels[:, 1:])
    targets = labels[:, 1:][positions[:, :-1]]  # (M,)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit row(s) for {targets.shape[0]} labelled position(s).")
    return F.cross_entropy(logits.float(), targets)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (the response): (R,).

    ``logits`` are (R, T, V), or (M, V) computed only at the M ``predicting_positions`` (row-major order).
    """
    _check_labelled(labels[:, 1:])
    if logits.ndim == 3:
        logits = logits[positions]  # (M, V)
    targets = labels[:, 1:][positions[:, :-1]]  # (M,)
    token_log_probs = -F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    rows = positions.nonzero()[:, 0]  # (M,) the row of each selected position
    return token_log_probs.new_zeros(labels.shape[0]).index_add(0, rows, token_log_probs)


class DPOLoss(NamedTuple):
    """The DPO loss of a batch of pairs and what to log about it (everything but ``loss`` is detached)."""

    loss: torch.Tensor
    """() mean over pairs of -log sigmoid(margin)."""
    chosen_rewards: torch.Tensor
    """(B,) implicit rewards beta * (log pi - log pi_ref) of the chosen answers."""
    rejected_rewards: torch.Tensor
    """(B,) the same for the rejected answers."""
    margins: torch.Tensor
    """(B,) chosen minus rejected reward."""
    reward_accuracy: torch.Tensor
    """() fraction of pairs whose chosen reward is strictly higher."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOLoss:
    """Sigmoid DPO loss (Rafailov et al. 2023) from sequence log-probabilities, each (B,).

    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over the B pairs.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    return DPOLoss(
        loss=-F.logsigmoid(margins).mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        margins=margins.detach(),
        reward_accuracy=(margins.detach() > 0).float().mean(),
    )


def hard_negative_loss(images: torch.Tensor, texts: torch.Tensor, negatives: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean -log p(true caption | image) between each image's caption and its own hard negative.

    images, texts, negatives: L2-normalised embeddings (B, E); row i of ``negatives`` is a caption of a
    scene that differs from image i's in one detail. Added to the batch contrastive loss (NegCLIP).
    """
    logits = logit_scale * torch.stack([(images * texts).sum(-1), (images * negatives).sum(-1)], dim=1)  # (B, 2)
    return F.cross_entropy(logits, torch.zeros(len(images), dtype=torch.long, device=images.device))
