"""Hugging Face causal LM + tokenizer, with the project's special tokens added."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dress_lightning.models.init import deterministic_init
from dress_lightning.special_tokens import IMAGE_TOKEN, PAD_TOKEN

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"

BUILTIN_LANGUAGE_MODELS: dict[str, dict[str, Any]] = {
    # A small Llama for CPU runs and tests: weights are initialised from a fixed seed, the
    # tokenizer is the one the project trains on its own text and ships (assets/dress-tiny-tokenizer).
    "dress-tiny-llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}
BUILTIN_TOKENIZER = ASSETS / "dress-tiny-tokenizer"


def load_tokenizer(name_or_path: str, added_tokens: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """Load a tokenizer by HF name or local path (built-in LM names map to the shipped tokenizer).

    ``<image>``, ``added_tokens`` (in order: the same ids every time) and, when missing, a pad token
    are added; the returned tokenizer pads on the left for generation only when asked: callers set
    ``padding_side`` explicitly.
    """
    source = str(BUILTIN_TOKENIZER) if name_or_path in BUILTIN_LANGUAGE_MODELS else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    added = tokenizer.add_tokens([IMAGE_TOKEN, *added_tokens], special_tokens=True)
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if added:
        log.info("Added %d special token(s) to the tokenizer of %s.", added, name_or_path)
    return tokenizer


def load_language_model(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
) -> PreTrainedModel:
    """Load a causal LM by HF name or local path, or build a built-in one sized for ``tokenizer``."""
    if name_or_path in BUILTIN_LANGUAGE_MODELS:
        spec = dict(BUILTIN_LANGUAGE_MODELS[name_or_path])
        config = AutoConfig.for_model(
            spec.pop("model_type"),
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec,
        )
        with deterministic_init():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the embeddings to cover tokens the tokenizer added; returns whether they grew."""
    if len(tokenizer) <= model.get_input_embeddings().num_embeddings:
        return False
    # New rows are drawn around the mean embedding (HF's mean_resizing), so untrained tokens are
    # harmless; seeded, so every rank and every reload draws the same rows.
    with deterministic_init():
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True
