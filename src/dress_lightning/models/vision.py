"""OpenCLIP vision tower that returns patch tokens from a chosen transformer block (or CNN stage)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from dress_lightning.models.init import deterministic_init

log = logging.getLogger(__name__)

BUILTIN_OPEN_CLIP_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "open_clip"
"""Model configs the project ships (e.g. ``dress-tiny-vit``); registered with open_clip on import."""

open_clip.add_model_config(BUILTIN_OPEN_CLIP_CONFIGS)


class _RandomInitWarningFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    open_clip says it on every build, and a run builds a tower several times (its geometry for the data
    module, the model, every reload), so a newcomer saw it 9 times in one job; the training task says
    it once, where it matters (``VisionLanguageTask.configure_model``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@dataclass(frozen=True)
class VisionSpec:
    """What the data pipeline needs to know about a tower, without its weights."""

    image_transform: Callable
    """open_clip's own eval preprocessing (PIL image -> (3, H, W) tensor)."""
    image_size: tuple[int, int]
    num_patches: int
    """Patch tokens per image = ``<image>`` tokens per image in the sequence."""
    hidden_size: int


def image_memory_format(visual: nn.Module) -> torch.memory_format:
    """The memory layout images should have for ``visual``: channels-last for a convolutional tower.

    oneDNN's CPU convolutions run fastest on channels-last inputs: the clip stage's step on the 96-px ResNet is
    about 1.35x faster (bench/README.md, "Channels-last convolutions"), the same function up to float rounding. The weights keep their layout, so FSDP, which shards only contiguous
    parameters, and checkpoints see them as before. A ViT's only convolution is its patch embedding: it keeps the
    default layout.
    """
    return torch.channels_last if isinstance(visual, ModifiedResNet) else torch.contiguous_format


def _patch_tokens(visual: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    # LLaVA semantics: hidden state of block `layer` (negative counts from the end), without the
    # CLS token and before the final LayerNorm; stop_early skips the blocks after it. A convolutional
    # tower (open_clip's ModifiedResNet, the RN50 family) gives the feature map of stage `layer`
    # instead: each of its cells is a token, in row-major order like a ViT's patches.
    convolutional = isinstance(visual, ModifiedResNet)
    out = visual.forward_intermediates(
        pixel_values, indices=[layer], stop_early=True, intermediates_only=True,
        output_fmt="NCHW" if convolutional else "NLC",
    )["image_intermediates"][0]
    if convolutional:
        out = out.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    return out


def _create(model_name: str, pretrained: str | None, device: str) -> tuple[nn.Module, Callable]:
    available = open_clip.list_models()
    if model_name not in available:
        raise ValueError(
            f"Unknown open_clip model {model_name!r}. Valid names: {', '.join(available)}. "
            "Register a custom architecture with open_clip.add_model_config(path_to_json)."
        )
    preprocess = {}
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"vision_pretrained={pretrained!r} is neither a local checkpoint file nor a pretrained tag of "
                f"{model_name!r} (tags: {', '.join(tags) or 'none'})."
            )
        if device == "meta":
            # Weights are not wanted on meta, but the tag's preprocessing (mean/std/resize) is.
            cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            preprocess = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            pretrained = None
    if device == "meta":
        pretrained = None
    quiet = _RandomInitWarningFilter()
    logging.getLogger().addFilter(quiet)  # open_clip logs on the root logger
    try:
        model, _, image_transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **preprocess
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    # Only the image tower is kept; the text tower is dropped with `model`.
    return model.visual, image_transform


def describe_vision_tower(model_name: str, pretrained: str | None = None, layer: int = -2) -> VisionSpec:
    """Transform and token geometry of a tower, found on the meta device: no weights loaded, no compute."""
    with torch.device("meta"):
        visual, image_transform = _create(model_name, pretrained, device="meta")
        size = visual.image_size
        image_size = (size, size) if isinstance(size, int) else tuple(size)
        tokens = _patch_tokens(visual, torch.zeros(1, 3, *image_size), layer)
    _, num_patches, hidden_size = tokens.shape
    return VisionSpec(image_transform, image_size, num_patches, hidden_size)


class VisionTower(nn.Module):
    """Wraps ``open_clip``'s image tower; ``forward`` maps images (B, 3, H, W) to patch tokens (B, N, D)."""

    def __init__(
        self, visual: nn.Module, spec: VisionSpec, layer: int, model_name: str, pretrained: str | None = None
    ) -> None:
        super().__init__()
        self.visual = visual
        self.memory_format = image_memory_format(visual)
        self.spec = spec
        self.layer = layer
        self.model_name = model_name
        self.pretrained = pretrained

    @property
    def image_transform(self) -> Callable:
        return self.spec.image_transform

    @property
    def image_size(self) -> tuple[int, int]:
        return self.spec.image_size

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if self.is_frozen:
            # A frozen tower stays in eval mode when Lightning puts the model in training mode: the
            # BatchNorm of a convolutional tower must use its running statistics, not the batch's.
            self.visual.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> patch tokens (B, N, D)."""
        pixel_values = pixel_values.to(next(self.visual.parameters()).dtype, memory_format=self.memory_format)
        if self.is_frozen:
            # No graph through a frozen tower: saves the activation memory of the whole ViT.
            with torch.no_grad():
                return _patch_tokens(self.visual, pixel_values, self.layer)
        return _patch_tokens(self.visual, pixel_values, self.layer)


def build_vision_tower(model_name: str, pretrained: str | None = None, layer: int = -2) -> VisionTower:
    """Build an open_clip image tower by model name, with a pretrained tag, a local checkpoint path, or random init."""
    spec = describe_vision_tower(model_name, pretrained, layer)
    with deterministic_init():
        visual, _ = _create(model_name, pretrained, device="cpu")
    if pretrained is None:
        log.info("open_clip %s built with seeded random weights (vision_pretrained is None).", model_name)
    return VisionTower(visual, spec, layer=layer, model_name=model_name, pretrained=pretrained)
