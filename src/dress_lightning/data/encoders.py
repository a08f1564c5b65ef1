"""Shard samples -> training examples and batches: the sample encoders, right-padded collation, left padding.

An encoder turns one decoded ``Sample`` into tensors: it picks what to train on (``select``),
renders and masks the conversation with the ``ConversationFormatter`` and preprocesses the image
with the vision tower's own transform. ``collate`` pads a list of examples into a batch with
Hugging Face keys (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``); ``pack`` lays them end
to end instead (padding-free rows, ``position_ids`` restarting at each sample).
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

    packable = True
    """Whether its batches may be packed (``pack``): not when a batch's rows mean something (preference pairs)."""

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

    def pack(self, examples: Sequence[dict[str, Any]], row_length: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
        """Batch encoded examples padding-free, several per row of about ``row_length`` tokens (``pack``)."""
        return pack(examples, self.formatter.tokenizer.pad_token_id, row_length, pad_to_multiple_of)

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

    packable = False

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


def pack(examples: Sequence[dict[str, Any]], pad_token_id: int, row_length: int,
         pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Lay examples end to end in rows of about ``row_length`` tokens: a padding-free batch with ``collate``'s keys.

    Each example, longest first, goes to the row holding the fewest tokens so far, so rows come out nearly
    equal (one may run a little over ``row_length``). Of the row counts from ceil(real tokens / ``row_length``)
    to one example per row (``collate``'s layout), the one with the fewest positions (rows x the longest row,
    rounded up to ``pad_to_multiple_of``) wins, the shorter rows on a tie: packing never pads more than
    ``collate``. ``position_ids`` restart at 0 with every example and with the padding at a row's end; the LM
    must attend within those runs only (``VisionLanguageTask.model_inputs`` passes them without an attention
    mask, from which transformers builds the block-diagonal causal mask). ``attention_mask`` marks the real
    tokens; images, ``ids`` and ``image_ids`` follow the examples in row order, and ``images_per_row`` (R,)
    says how many each row holds.
    """
    lengths = [len(e["input_ids"]) for e in examples]

    def row_width(rows: list[list[int]]) -> int:
        return math.ceil(max(sum(lengths[i] for i in row) for row in rows) / pad_to_multiple_of) * pad_to_multiple_of

    fewest = min(len(examples), math.ceil(sum(lengths) / row_length))
    rows = min((_balanced_rows(lengths, count) for count in range(len(examples), fewest - 1, -1)),
               key=lambda rows: len(rows) * row_width(rows))
    width = row_width(rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            end = start + lengths[i]
            input_ids[r, start:end] = examples[i]["input_ids"]
            labels[r, start:end] = examples[i]["labels"]
            attention_mask[r, start:end] = 1
            position_ids[r, start:end] = torch.arange(lengths[i])
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the padding: a run of its own
    placed = [examples[i] for members in rows for i in members]
    return {
        "input_ids": input_ids,  # (R, L)
        "attention_mask": attention_mask,  # (R, L): real tokens
        "labels": labels,  # (R, L)
        "position_ids": position_ids,  # (R, L)
        "images_per_row": torch.tensor([len(members) for members in rows]),  # (R,)
        "pixel_values": torch.stack([e["pixel_values"] for e in placed]),  # (B, 3, H, W)
        "ids": [e["id"] for e in placed],
        "image_ids": [e["image_id"] for e in placed],
        "num_truncated": sum(e["num_truncated"] for e in placed),
    }


def _balanced_rows(lengths: Sequence[int], count: int) -> list[list[int]]:
    """Indices of ``lengths`` in ``count`` rows: longest first, each into the row with the fewest tokens so far."""
    rows: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = loads.index(min(loads))
        rows[row].append(i)
        loads[row] += lengths[i]
    return rows
