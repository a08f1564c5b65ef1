"""The ``clip`` stage: contrastive image-caption pretraining of the vision tower, with open_clip's own loss.

LLaVA and DRESS freeze a *pretrained* CLIP tower. The embedded default cannot download one, and a
random frozen tower hands the language model nearly the same features for every image, so the
tiny preset's tower is first trained here as a CLIP (image tower + a small text tower, InfoNCE
over the batch: ``open_clip.loss.ClipLoss``) on image-caption pairs, then frozen by the later
stages. The fit ends by exporting the whole CLIP state dict as open_clip-format safetensors,
which ``vision_pretrained: PATH`` loads like any local open_clip checkpoint (no unpickling).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from open_clip.loss import ClipLoss
from safetensors.torch import save_file

from dress_lightning.models import VisionLanguageConfig
from dress_lightning.models.init import deterministic_init
from dress_lightning.models.vision import image_memory_format
from dress_lightning.tasks.losses import hard_negative_loss
from dress_lightning.version import __version__

log = logging.getLogger(__name__)

RETRIEVAL_POOL = 100
"""Captions each image is ranked against in validation retrieval (consecutive val samples)."""


def retrieval_accuracy(images: torch.Tensor, texts: torch.Tensor, pool: int) -> torch.Tensor:
    """Top-1 image-to-caption accuracy, each image ranking the ``pool`` captions of its chunk; (N, E) inputs.

    Samples are split into consecutive chunks of ``pool`` (an incomplete last chunk is dropped);
    row i of ``texts`` is the caption of row i of ``images``.
    """
    usable = len(images) // pool * pool
    if usable == 0:
        raise ValueError(f"retrieval among {pool} captions needs at least {pool} samples, got {len(images)}")
    images = images[:usable].reshape(-1, pool, images.shape[-1])  # (C, P, E)
    texts = texts[:usable].reshape(-1, pool, texts.shape[-1])  # (C, P, E)
    best = (images @ texts.transpose(1, 2)).argmax(dim=-1)  # (C, P)
    return (best == torch.arange(pool, device=best.device)).float().mean()


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


class ContrastiveTowerTask(L.LightningModule):
    """Trains ``model.vision_model`` as a CLIP on image-caption pairs and exports it for the later stages.

    Only the vision fields of ``model`` are read (``vision_model``, ``vision_pretrained`` to continue from);
    the same config object is linked into the data module, which derives the image transform from it.
    """

    def __init__(
        self,
        model: VisionLanguageConfig | None = None,
        export_path: str | None = "runs/clip/tower.safetensors",
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            model: The backbone config; its vision fields name the open_clip model to train.
            export_path: Where the trained CLIP's state dict goes at the end of fit (open_clip format,
                safetensors; later stages set ``vision_pretrained`` to it). None: no export.
            optimizer: Optimizer over all CLIP parameters (YAML: ``class_path: torch.optim.AdamW``).
            scheduler: Learning-rate scheduler, stepped every optimizer step.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_config = model or VisionLanguageConfig()
        self.export_path = export_path
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.clip: open_clip.CLIP | None = None
        self.loss: ClipLoss | None = None
        self.image_memory_format = torch.contiguous_format
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_model(self) -> None:
        if self.clip is not None:
            return
        with deterministic_init():
            self.clip = open_clip.create_model(self.model_config.vision_model,
                                               pretrained=self.model_config.vision_pretrained)
        self.image_memory_format = image_memory_format(self.clip.visual)
        trainer = self._trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Features are gathered from every rank, so each rank's images meet all captions of the step.
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.clip.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and caption embeddings, both (B, E)."""
        pixel_values = batch["pixel_values"].contiguous(memory_format=self.image_memory_format)
        images = self.clip.encode_image(pixel_values, normalize=True)
        texts = self.clip.encode_text(batch["input_ids"], normalize=True)
        return images, texts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, texts = self.embed(batch)
        scale = self.clip.logit_scale.exp()
        loss = self.loss(images, texts, scale)
        if "negative_ids" in batch:  # CaptionPairDataModule(hard_negatives=True)
            negatives = self.clip.encode_text(batch["negative_ids"], normalize=True)
            hard = hard_negative_loss(images, texts, negatives, scale)
            self.log("train/hard_negative_loss", hard, batch_size=images.shape[0])
            loss = loss + hard
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        self.log("train/logit_scale", self.clip.logit_scale.exp(), batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, texts = self.embed(batch)
        self.log("val/loss", ClipLoss()(images, texts, self.clip.logit_scale.exp()), prog_bar=True,
                 sync_dist=True, batch_size=images.shape[0])
        self._val_features.append((images, texts))

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        images = torch.cat([i for i, _ in self._val_features])
        texts = torch.cat([t for _, t in self._val_features])
        self._val_features.clear()
        if len(images) >= RETRIEVAL_POOL:
            accuracy = retrieval_accuracy(images, texts, RETRIEVAL_POOL)
            self.log(f"val/image_to_caption@{RETRIEVAL_POOL}", accuracy, prog_bar=True, sync_dist=True)

    def next_commands(self, checkpoint: str) -> list[str]:
        """The end-of-fit summary's next steps: a tower is probed and read by the later stages, not chatted with."""
        if self.export_path is None:
            return []
        config = self.model_config
        return [
            f"python -m dress_lightning probe-tower --vision-model {config.vision_model} "
            f"--vision-pretrained {self.export_path} --vision-layer={config.vision_layer}",
            "python -m dress_lightning fit -c configs/sft.yaml   # reads the tower as model.vision_pretrained",
        ]

    # Lightning calls on_train_end on every rank; the file is written once.
    @rank_zero_only
    def on_train_end(self) -> None:
        if self.export_path is None:
            return
        path = Path(self.export_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        partial = path.with_name(f".{path.name}.partial")
        save_file(state, partial, metadata={"open_clip_model": self.model_config.vision_model,
                                            "global_step": str(self.global_step)})
        partial.replace(path)  # atomic: a later stage never reads a half-written tower
        provenance = {
            "tool": f"{type(self).__module__}.{type(self).__qualname__}",
            "dress_lightning_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "open_clip_model": self.model_config.vision_model,
            "initialised_from": self.model_config.vision_pretrained,
            "global_step": self.global_step,
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            "last_metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
        }
        path.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
        log.info("Exported the trained %s tower to %s (vision_pretrained: %s).",
                 self.model_config.vision_model, path, path)
