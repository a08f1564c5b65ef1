"""Patch features of a frozen vision tower, computed once per image and reused every epoch.

A frozen tower maps the same image to the same features in every epoch; with the cache, the tower
runs once per distinct image and later batches take the stored features (``image_features``)
instead of recomputing them from ``pixel_values``. The cache is opt-in and refuses to serve
features that could be stale:

- entries are keyed by image id (the data pipeline's content digest of the image bytes) and the
  cache belongs to one tower, identified by its model name, pretrained tag and layer;
- it refuses a tower that trains or that is random in training mode (dropout, patch dropout);
- every lookup checks that the tower's weights were not changed in place or replaced since the
  first entry (``load_state_dict``, an optimizer step): then it raises instead of serving old features.

Images must be preprocessed deterministically (``ShardDataModule`` uses open_clip's eval transform);
random augmentation would make one image id stand for many inputs. Memory: one (N, D) tensor per
image in CPU memory (tiny preset: 64 x 128 fp32 = 32 KiB), moved to the tower's device when
served; ``max_images`` bounds it (``model.init_args.feature_cache_max_images``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dress_lightning.models.vision import VisionTower


class StaleFeatureCacheError(RuntimeError):
    """The vision tower changed after features were cached; they no longer match what it computes."""


def _random_in_training(tower: nn.Module) -> list[str]:
    """Modules of ``tower`` whose output is random in training mode."""
    found = []
    for name, module in tower.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.Dropout) else getattr(module, "prob", None)
        if isinstance(module, nn.MultiheadAttention):
            rate = module.dropout
        if isinstance(rate, (int, float)) and rate > 0:
            found.append(f"{name or type(module).__name__} ({rate})")
    return found


class VisionFeatureCache:
    """In-memory patch features of one frozen ``VisionTower``, by image id."""

    def __init__(self, tower: VisionTower, max_images: int | None = None) -> None:
        """
        Args:
            tower: The frozen tower whose outputs are cached.
            max_images: Keep at most this many images' features (later ones are computed, not stored); None: all.
        """
        if not tower.is_frozen:
            raise ValueError(
                "VisionFeatureCache needs a frozen vision tower (freeze_vision: true): the features of a tower "
                "that trains change every step. Turn the feature cache off to train the tower."
            )
        random_parts = _random_in_training(tower)
        if random_parts:
            raise ValueError(
                f"The vision tower has random parts in training mode ({', '.join(random_parts)}); its features "
                "differ on every call, so they cannot be cached. Turn the feature cache off."
            )
        self.tower = tower
        self.key = (tower.model_name, tower.pretrained, tower.layer)
        """Which tower the entries belong to: (model name, pretrained tag or file, layer)."""
        self.max_images = max_images
        self.hits = 0
        self.misses = 0
        self._features: dict[str, torch.Tensor] = {}
        self._weights = self._weights_state()

    def __len__(self) -> int:
        return len(self._features)

    def _weights_state(self) -> tuple[tuple[int, int], ...]:
        # A tensor's _version grows with every in-place write (optimizer steps, load_state_dict's copy_);
        # its id changes when a parameter is replaced. Cheap enough to check on every lookup.
        tensors = [*self.tower.parameters(), *self.tower.buffers()]
        return tuple((id(t), t._version) for t in tensors)

    def _check(self) -> None:
        if not self.tower.is_frozen:
            raise StaleFeatureCacheError(
                "The vision tower was unfrozen after its features were cached; cached features would go stale. "
                "Turn the feature cache off to train the tower."
            )
        if self._weights_state() != self._weights:
            raise StaleFeatureCacheError(
                f"The weights of vision tower {self.key} changed after {len(self)} image(s) were cached "
                "(loaded or updated in place); build a new VisionFeatureCache for the new weights."
            )

    def __call__(self, pixel_values: torch.Tensor, image_ids: Sequence[str]) -> torch.Tensor:
        """Patch features (B, N, D) of images (B, 3, H, W) with ids ``image_ids``; the tower runs on misses only."""
        if len(image_ids) != pixel_values.shape[0]:
            raise ValueError(f"{len(image_ids)} image id(s) for {pixel_values.shape[0]} image(s).")
        self._check()
        missing = [row for row, key in enumerate(image_ids) if key not in self._features]
        self.hits += len(image_ids) - len(missing)
        self.misses += len(missing)
        if not missing:
            return torch.stack([self._features[key] for key in image_ids]).to(pixel_values.device)
        computed = self.tower(pixel_values[missing])  # (M, N, D)
        fresh = dict(zip((image_ids[row] for row in missing), computed))
        for key, features in fresh.items():
            if self.max_images is None or len(self._features) < self.max_images:
                # On the CPU (a copy, not a view of the batch): accelerator memory is for training.
                self._features[key] = features.to("cpu", copy=True)
        device = pixel_values.device
        return torch.stack([fresh[key] if key in fresh else self._features[key].to(device) for key in image_ids])
