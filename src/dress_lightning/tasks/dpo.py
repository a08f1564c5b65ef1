"""DPO (Rafailov et al. 2023) on preference pairs built from judged NLF: a baseline to conditional RL."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import nn

from dress_lightning.conversation import IGNORE_INDEX
from dress_lightning.data.dpo import DPODataModule
from dress_lightning.tasks.losses import dpo_loss, predicting_positions, sequence_log_probs
from dress_lightning.tasks.sft import SFTTask

log = logging.getLogger(__name__)

ReferenceLogps = Literal["precomputed", "on_the_fly"]

REFERENCE_CHECKPOINT_KEY = "dpo_reference_logps"
"""Checkpoint entry holding the precomputed reference log-probabilities (not weights: not in the state_dict)."""


@dataclass
class ReferenceTable:
    """The reference model's sequence log-probabilities of every pair, computed once before training."""

    ids: list[str]
    """Pair ids (the pair samples' ids)."""
    logps: torch.Tensor
    """(N, 2): chosen, rejected."""
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = {pair_id: row for row, pair_id in enumerate(self.ids)}

    def lookup(self, ids: Sequence[str]) -> torch.Tensor:
        """(B, 2) chosen and rejected log-probabilities of the pairs ``ids``."""
        missing = [pair_id for pair_id in ids if pair_id not in self._rows]
        if missing:
            raise KeyError(
                f"No precomputed reference log-probabilities for {len(missing)} pair(s) (e.g. {missing[0]!r}): the "
                "pairs changed after they were computed (new NLF shards or pair options on resume?). Start a new fit, "
                "or set model.init_args.reference_logps: on_the_fly."
            )
        return self.logps[[self._rows[pair_id] for pair_id in ids]]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that never trains: trainable weights are copied, frozen ones shared.

    With LoRA that copies the adapters and the projector only; the frozen LM and vision tower exist once.
    """
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}  # deepcopy's memo: reuse, do not copy
    return copy.deepcopy(model, memo=shared).requires_grad_(False)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) for the block; every submodule's own mode comes back after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


class DPOTask(SFTTask):
    """Sigmoid DPO on ``DPODataModule``'s pairs, from the SFT model (``init_checkpoint``), which is also the reference.

    Training batches hold 2B rows, the chosen answers and then the rejected ones, in one forward;
    validation and test batches are SFT data under the plain LM loss, as for every other objective.

    The reference log-probabilities (``reference_logps``):

    * ``precomputed``: once per pair before the first step, by the policy itself (it still is the initial
      model then), and saved in checkpoints so that a resumed fit reuses them; no reference weights are kept.
    * ``on_the_fly``: every step, by a frozen copy of the initial model that shares its frozen weights (with
      LoRA only the adapters and the projector are copied). Not the base model with the adapters disabled:
      the adapters a LoRA SFT checkpoint loads, and the projector, are part of the SFT model.

    The reference is never trained and never in the checkpoint's ``state_dict``.
    """

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        chosen_nll_weight: float = 0.0,
        reference_logps: ReferenceLogps = "precomputed",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            beta: Strength of the implicit KL penalty towards the reference (DPO's beta).
            chosen_nll_weight: Weight of an added LM loss on the chosen answers (0: pure DPO; RPO-style when > 0).
            reference_logps: ``precomputed`` once before training, or ``on_the_fly`` every step (see the class).
            *args, **kwargs: Everything ``SFTTask`` takes.
        """
        super().__init__(*args, **kwargs)
        if beta <= 0:
            raise ValueError(f"model.init_args.beta must be positive, got {beta}.")
        if chosen_nll_weight < 0:
            raise ValueError(f"model.init_args.chosen_nll_weight must be >= 0, got {chosen_nll_weight}.")
        if reference_logps not in ("precomputed", "on_the_fly"):
            raise ValueError(
                f"model.init_args.reference_logps must be precomputed or on_the_fly, got {reference_logps!r}."
            )
        self.beta = beta
        self.chosen_nll_weight = chosen_nll_weight
        self.reference_logps = reference_logps
        self.reference: nn.Module | None = None
        """The frozen initial model (``on_the_fly``, while fitting)."""
        self.reference_table: ReferenceTable | None = None
        """The reference log-probabilities of every pair (``precomputed``)."""

    # -- the reference --------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if self.reference_logps == "on_the_fly" and fitting and self.device_mesh is not None:
            raise ValueError("model.init_args.reference_logps: on_the_fly keeps an unsharded reference copy, which "
                             "FSDP2 (ModelParallelStrategy) cannot run: set reference_logps: precomputed or use ddp.")
        super().configure_model()
        # Only a fit needs the reference; evaluation and rollouts load the task without one. Made before a
        # resumed fit restores its trained weights, so it is the initial (SFT) model either way.
        if self.reference_logps == "on_the_fly" and fitting:
            self.reference = frozen_copy(self.model)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, DPODataModule):
            raise TypeError("DPOTask trains on preference pairs: set data.class_path: "
                            "dress_lightning.data.dpo.DPODataModule (see configs/dpo.yaml).")
        if self.reference_logps != "precomputed" or self.reference_table is not None:
            return  # on the fly, or restored with the checkpoint of a resumed fit
        if self.trainer.ckpt_path is not None:
            raise RuntimeError(
                f"The checkpoint {self.trainer.ckpt_path} holds no precomputed reference log-probabilities (was it "
                "trained with reference_logps: on_the_fly?): resume with model.init_args.reference_logps: on_the_fly."
            )
        start = time.perf_counter()
        self.reference_table = self.precompute_reference(datamodule.pair_batches())
        log.info("Reference log-probabilities of %d pairs computed in %.0f s.", len(self.reference_table.ids),
                 time.perf_counter() - start)

    @torch.no_grad()
    def precompute_reference(self, batches: Iterable[dict[str, Any]]) -> ReferenceTable:
        """Every pair's log-probabilities in ``batches`` under the current model (before step 1: the initial one)."""
        ids, logps = [], []
        with evaluating(self.model), self.trainer.precision_plugin.forward_context():
            for batch in batches:
                batch = move_data_to_device(batch, self.device)
                pairs = len(batch["ids"]) // 2
                chosen, rejected = self.answer_log_probs(self.model, self.model_inputs(batch), batch["labels"]).chunk(2)
                ids += batch["ids"][:pairs]
                logps.append(torch.stack([chosen, rejected], dim=1).float().cpu())  # (B, 2)
        return ReferenceTable(ids, torch.cat(logps))

    def reference_log_probs(self, batch: dict[str, Any], inputs: dict[str, Any]) -> torch.Tensor:
        """(B, 2) the reference's chosen and rejected log-probabilities of a pair batch."""
        if self.reference is not None:
            # Eval mode only for the pass (no dropout): a reference left in eval mode makes Lightning warn at fit start.
            with torch.no_grad(), evaluating(self.reference):
                logps = self.answer_log_probs(self.reference, inputs, batch["labels"])  # (2B,)
            return torch.stack(logps.chunk(2), dim=1)
        if self.reference_table is None:
            raise RuntimeError("DPOTask has no reference: it is made when a Trainer fits the task (on_fit_start).")
        pairs = len(batch["ids"]) // 2
        return self.reference_table.lookup(batch["ids"][:pairs]).to(self.device)

    # -- the loss -------------------------------------------------------------------------------

    @staticmethod
    def answer_log_probs(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """(R,) each row's summed log-probability of its labelled (answer) tokens under ``model``."""
        positions = predicting_positions(labels)  # (R, T)
        logits = model(**inputs, logits_to_keep=positions).logits  # (M, V), or (R, T, V) for an LM without the mask
        return sequence_log_probs(logits, labels, positions)

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs, labels = self.model_inputs(batch), batch["labels"]  # labels (2B, T): chosen rows, then rejected
        pairs = labels.shape[0] // 2
        policy_chosen, policy_rejected = self.answer_log_probs(self.model, inputs, labels).chunk(2)  # (B,) each
        ref_chosen, ref_rejected = self.reference_log_probs(batch, inputs).unbind(1)  # (B,) each
        dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        loss = dpo.loss
        if self.chosen_nll_weight > 0:
            chosen_nll = -policy_chosen.sum() / (labels[:pairs, 1:] != IGNORE_INDEX).sum()  # per answer token
            loss = loss + self.chosen_nll_weight * chosen_nll
            self.log("train/chosen_nll", chosen_nll, batch_size=pairs)
        self.log("train/dpo_loss", dpo.loss, batch_size=pairs)
        self.log("train/reward_accuracy", dpo.reward_accuracy, prog_bar=True, batch_size=pairs)
        self.log("train/reward_margin", dpo.margins.mean(), batch_size=pairs)
        self.log("train/rewards_chosen", dpo.chosen_rewards.mean(), batch_size=pairs)
        self.log("train/rewards_rejected", dpo.rejected_rewards.mean(), batch_size=pairs)
        return loss

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # trainable tensors only: the reference copy is not among them
        if self.reference_table is not None:
            table = self.reference_table
            checkpoint[REFERENCE_CHECKPOINT_KEY] = {"ids": table.ids, "logps": table.logps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(REFERENCE_CHECKPOINT_KEY)
        if saved is not None:
            self.reference_table = ReferenceTable(saved["ids"], saved["logps"])
