"""Assemble the vision-language model from a plain config: build, freeze explicitly, report what trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dress_lightning.models.language import fit_embeddings, load_language_model, load_tokenizer
from dress_lightning.models.projector import build_projector
from dress_lightning.models.vision import build_vision_tower
from dress_lightning.models.vlm import VisionLanguageModel
from dress_lightning.special_tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VisionLanguageConfig:
    """What to build. The defaults are the offline ``tiny`` preset; real runs set names or paths."""

    vision_model: str = "dress-tiny-vit"
    """open_clip model name (``open_clip.list_models()``), e.g. ``ViT-L-14-336`` (LLaVA-1.5) or ``EVA01-g-14`` (DRESS)."""
    vision_pretrained: str | None = None
    """open_clip pretrained tag (e.g. ``openai``), a local checkpoint file, or None for random weights."""
    vision_layer: int = -2
    """Transformer block whose patch tokens feed the projector; negative counts from the end (LLaVA: -2)."""
    projector: str = "linear"
    """Projector name: ``linear`` (DRESS) or ``mlp2x_gelu`` (LLaVA-1.5)."""
    image_position_embedding: bool = False
    """Add a learned embedding per image token before the projector, so the LM knows each token's grid cell:
    for towers whose tokens do not carry their position (the tiny CNN's last stage); ViTs carry their own."""
    language_model: str = "dress-tiny-llama"
    """Hugging Face causal LM name or local directory (Llama, Qwen2, ...); ``dress-tiny-llama`` is built in."""
    tokenizer: str | None = None
    """Tokenizer name or path; None uses ``language_model``'s."""
    language_model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the LM weights are loaded in; mixed precision is set on the Trainer instead."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``)."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (DRESS and LLaVA do)."""
    freeze_projector: bool = False
    """Freeze the projector (e.g. when only LoRA on the LM trains)."""
    freeze_language_model: bool = True
    """Freeze the LM's own weights (pretraining; LoRA adapters train even when this is True)."""
    added_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the tokenizer (with new embedding rows), e.g. the reserved condition tokens of
    conditional RL (``conditions.condition_tokens``); set by the task that needs them."""

    def __post_init__(self) -> None:
        # jsonargparse (4.53) turns a dotted command-line ``null`` inside a subclass's init_args into the string
        # "None" (``--model.init_args.model.vision_pretrained null``); YAML and JSON give None. Read it as meant.
        for name in ("vision_pretrained", "tokenizer", "attn_implementation"):
            if getattr(self, name) == "None":
                setattr(self, name, None)


@dataclass(frozen=True)
class ParameterReport:
    """Trainable / total parameter counts, overall and per component."""

    trainable: int
    total: int
    by_component: dict[str, tuple[int, int]]

    def __str__(self) -> str:
        rows = [f"{name}: {t:,} / {n:,}" for name, (t, n) in self.by_component.items()]
        return f"trainable {self.trainable:,} / {self.total:,} parameters ({'; '.join(rows)})"


def count_parameters(model: VisionLanguageModel) -> ParameterReport:
    """Count trainable and total parameters of ``model`` and of each of its towers."""

    def counts(module: nn.Module) -> tuple[int, int]:
        params = list(module.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    by_component = {
        name: counts(getattr(model, name)) for name in ("vision", "projector", "language_model")
    }
    trainable, total = counts(model)
    return ParameterReport(trainable=trainable, total=total, by_component=by_component)


def build_tokenizer(config: VisionLanguageConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer ``config`` names, with the project's special tokens added."""
    return load_tokenizer(config.tokenizer or config.language_model, config.added_tokens)


def build_vision_language_model(
    config: VisionLanguageConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> VisionLanguageModel:
    """Build the model ``config`` describes; everything is frozen, then only what the flags allow trains."""
    tokenizer = tokenizer or build_tokenizer(config)
    vision = build_vision_tower(config.vision_model, config.vision_pretrained, config.vision_layer)
    language_model = load_language_model(
        config.language_model,
        tokenizer,
        dtype=DTYPES[config.language_model_dtype],
        attn_implementation=config.attn_implementation,
    )
    projector = build_projector(
        config.projector,
        vision.hidden_size,
        language_model.config.hidden_size,
        position_embedding_tokens=vision.num_patches if config.image_position_embedding else 0,
    )
    model = VisionLanguageModel(
        vision=vision,
        projector=projector,
        language_model=language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resized_embeddings=fit_embeddings(language_model, tokenizer),
    )
    model.requires_grad_(False)
    for component, frozen in (
        (model.vision, config.freeze_vision),
        (model.projector, config.freeze_projector),
        (model.language_model, config.freeze_language_model),
    ):
        component.requires_grad_(not frozen)
    log.info("Built %s + %s + %s: %s", config.vision_model, config.projector, config.language_model, count_parameters(model))
    return model
