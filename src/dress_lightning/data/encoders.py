"""Shard samples -> training examples and batches: the sample encoders, right-padded collation, left padding.

An encoder turns one decoded ``Sample`` into tensors: it picks what to train on (``select``),
renders and masks the conversation with the ``ConversationFormatter`` and preprocesses the image
with the vision tower's own transform. ``collate`` pads a list of examples into a batch with
Hugging Face keys (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dress_lightning.conversation import IGNORE_INDEX, ConversationFormatError, ConversationFormatter
from dress_lightning.data.images import decode_image
from dress_lightning.data.schema import Sample
from dress_lightning.data.skips import SkipRecord
from dress_lightning.special_tokens import IMAGE_TOKEN


def image_id(image: bytes) -> str:
    """Content digest of an encoded image: the key under which its vision features may be cached."""
    return hashlib.blake2b(image, digest_size=16).hexdigest()


class SampleEncoder:
    """Decoded shard sample -> one training example (input_ids, labels, pixel_values)."""

    def __init__(self, formatter: ConversationFormatter, image_transform: Callable[[Image.Image], torch.Tensor]):
        self.formatter = formatter
        self.image_transform = image_transform

    def select(self, sample: Sample) -> tuple[list[dict], list[str | None] | None, list[bool] | None]:
        """What to train on: the conversation, a condition per assistant turn, which turns carry loss.

        Plain SFT: the whole conversation, no conditions, every response (conditional RL overrides this).
        """
        return sample.record["conversation"], None, None

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        """Batch encoded examples (right padding for training)."""
        return collate(examples, self.formatter.tokenizer.pad_token_id, pad_to_multiple_of)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        encoded = self.formatter.encode(*self.select(sample))
        with decode_image(sample.image, sample.record["id"]) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        return {
            "id": sample.record["id"],
            "input_ids": torch.tensor(encoded.input_ids),
            "labels": torch.tensor(encoded.labels),
            "pixel_values": pixel_values,
            "image_id": image_id(sample.image),
            "num_truncated": encoded.num_truncated,
        }


class CaptionEncoder(SampleEncoder):
    """Caption data for projector pretraining: ``<image>`` + a brief-description request -> one caption."""

    INSTRUCTIONS = (
        "Describe the image briefly.",
        "Give a short caption for this image.",
        "Summarize the visual content of the image.",
    )

    def select(self, sample: Sample) -> tuple[list[dict], None, None]:
        captions = sample.record["annotations"]["captions"]
        if not captions:
            raise ConversationFormatError(f"sample {sample.record['id']!r} has no caption to pretrain on")
        # crc32, not hash(): the choice must not change with PYTHONHASHSEED across workers and runs.
        pick = zlib.crc32(sample.record["id"].encode())
        conversation = [
            {"role": "user", "content": f"{IMAGE_TOKEN}\n{self.INSTRUCTIONS[pick % len(self.INSTRUCTIONS)]}"},
            {"role": "assistant", "content": captions[pick % len(captions)]},
        ]
        return conversation, None, None


class PromptEncoder(SampleEncoder):
    """Generation prompts: the conversation up to its first user turn, left-padded in batches.

    The sample itself travels with the prompt so that judges and writers downstream see the
    annotations and the image.
    """

    def __init__(
        self,
        formatter: ConversationFormatter,
        image_transform: Callable,
        condition: str | None = None,
        exclude_ids: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(formatter, image_transform)
        self.condition = condition
        self.exclude_ids = exclude_ids

    def __call__(self, sample: Sample) -> dict[str, Any]:
        if sample.record["id"] in self.exclude_ids:
            raise SkipRecord("already done")
        prompt = self.formatter.encode_prompt(sample.record["conversation"][:1], self.condition)
        with decode_image(sample.image, sample.record["id"]) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        return {"id": sample.record["id"], "input_ids": torch.tensor(prompt), "pixel_values": pixel_values,
                "sample": sample}

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        input_ids, attention_mask = left_pad([e["input_ids"] for e in examples], self.formatter.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,  # (B, T)
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
            "ids": [e["id"] for e in examples],
            # Plain dicts: Lightning's device transfer cannot walk frozen dataclasses. Sample(**d) rebuilds one.
            "samples": [{"record": e["sample"].record, "image": e["sample"].image, "image_ext": e["sample"].image_ext}
                        for e in examples],
            "stop_token_ids": self.formatter.stop_token_ids,
        }


ENCODERS: dict[str, type[SampleEncoder]] = {"conversation": SampleEncoder, "caption": CaptionEncoder}


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts (generation appends on the right): input_ids and attention_mask, both (B, T)."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``) and stack."""
    longest = max(len(e["input_ids"]) for e in examples)
    length = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = example["input_ids"]
        labels[row, :n] = example["labels"]
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T)
        "labels": labels,  # (B, T)
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
        "ids": [e["id"] for e in examples],
        "image_ids": [e["image_id"] for e in examples],
        "num_truncated": sum(e["num_truncated"] for e in examples),
    }
