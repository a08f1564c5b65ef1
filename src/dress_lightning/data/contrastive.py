"""Image-caption pairs for contrastive pretraining of the vision tower (the ``clip`` stage).

Each sample becomes its image (the tower's own transform) and one of its reference captions,
tokenized with the open_clip tokenizer of the tower's model config (its text tower reads them).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from typing import Any

import open_clip
import torch
from PIL import Image

from dress_lightning.conversation import ConversationFormatError, ConversationFormatter
from dress_lightning.data.datamodule import SampleEncoder, ShardDataModule, image_id
from dress_lightning.data.schema import Sample


class CaptionPairEncoder(SampleEncoder):
    """Sample -> (pixel_values, caption tokens); a caption is drawn afresh at every visit of the sample."""

    def __init__(self, formatter: ConversationFormatter, image_transform: Callable, text_tokenizer: Callable,
                 seed: int = 0) -> None:
        super().__init__(formatter, image_transform)
        self.text_tokenizer = text_tokenizer
        # Every worker forks this generator with the same state but reads other samples: the draws
        # differ across samples and visits, and repeat exactly in a rerun with the same loader setup.
        self.rng = random.Random(seed)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        captions = sample.record["annotations"]["captions"]
        if not captions:
            raise ConversationFormatError(f"sample {sample.record['id']!r} has no caption to pretrain on")
        with Image.open(io.BytesIO(sample.image)) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        text = self.text_tokenizer([self.rng.choice(captions)])[0]  # (L,)
        return {"id": sample.record["id"], "input_ids": text, "pixel_values": pixel_values,
                "image_id": image_id(sample.image)}

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        return {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),  # (B, L), open_clip's fixed context
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
            "ids": [e["id"] for e in examples],
            "image_ids": [e["image_id"] for e in examples],
        }


class CaptionPairDataModule(ShardDataModule):
    """``ShardDataModule`` streaming image-caption pairs for the contrastive tower stage."""

    def make_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        tokenizer = open_clip.get_tokenizer(self.model_config.vision_model)
        return CaptionPairEncoder(formatter, image_transform, tokenizer, seed=self.seed)
