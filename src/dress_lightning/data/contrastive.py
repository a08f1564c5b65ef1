"""Image-caption pairs for contrastive pretraining of the vision tower (the ``clip`` stage).

Each sample becomes its image (the tower's own transform) and one of its reference captions,
tokenized with the open_clip tokenizer of the tower's model config (its text tower reads them).

With ``hard_negatives`` (ShapeWorld scenes), each pair also carries the same style of caption for
a counterfactual scene: one object's shape replaced by another (NegCLIP-style, Yuksekgonul et al.
2023). Random captions of a batch rarely differ in shape alone, so plain contrastive training
learns colour and layout long before shape; the hard negative asks for shape directly.
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
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.encoders import SampleEncoder, image_id
from dress_lightning.data.schema import Sample
from dress_lightning.data.shapeworld import SHAPES, captions

SHAPEWORLD_ATTRIBUTES = ("shape", "color", "size", "position")


class CaptionPairEncoder(SampleEncoder):
    """Sample -> (pixel_values, caption tokens); a caption is drawn afresh at every visit of the sample."""

    packable = False  # open_clip's text tower reads fixed-length rows, one caption each

    def __init__(self, formatter: ConversationFormatter, image_transform: Callable, text_tokenizer: Callable,
                 seed: int = 0, hard_negatives: bool = False) -> None:
        super().__init__(formatter, image_transform)
        self.text_tokenizer = text_tokenizer
        self.hard_negatives = hard_negatives
        # Every worker forks this generator with the same state but reads other samples: the draws
        # differ across samples and visits, and repeat exactly in a rerun with the same loader setup.
        self.rng = random.Random(seed)

    def __call__(self, sample: Sample) -> dict[str, Any]:
        captions = sample.record["annotations"]["captions"]
        if not captions:
            raise ConversationFormatError(f"sample {sample.record['id']!r} has no caption to pretrain on")
        with Image.open(io.BytesIO(sample.image)) as image:
            pixel_values = self.image_transform(image.convert("RGB"))
        style = self.rng.randrange(len(captions))
        example = {"id": sample.record["id"], "input_ids": self.text_tokenizer([captions[style]])[0],  # (L,)
                   "pixel_values": pixel_values, "image_id": image_id(sample.image)}
        if self.hard_negatives:
            example["negative_ids"] = self.text_tokenizer([self.shape_swapped_caption(sample, style)])[0]  # (L,)
        return example

    def shape_swapped_caption(self, sample: Sample, style: int) -> str:
        """Caption ``style`` of the scene with one object's shape changed (ShapeWorld annotations only)."""
        objects = sample.record["annotations"].get("objects") or []
        if not objects or not all(all(k in o for k in SHAPEWORLD_ATTRIBUTES) for o in objects):
            raise ConversationFormatError(
                f"sample {sample.record['id']!r} has no ShapeWorld objects to swap a shape in: "
                "data.init_args.hard_negatives needs ShapeWorld scenes"
            )
        swapped = [dict(o) for o in objects]
        target = self.rng.randrange(len(swapped))
        swapped[target]["shape"] = self.rng.choice([s for s in SHAPES if s != swapped[target]["shape"]])
        return captions(swapped)[style]

    def collate(self, examples: Sequence[dict[str, Any]], pad_to_multiple_of: int = 1) -> dict[str, Any]:
        return {
            "input_ids": torch.stack([e["input_ids"] for e in examples]),  # (B, L), open_clip's fixed context
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),  # (B, 3, H, W)
            "ids": [e["id"] for e in examples],
            "image_ids": [e["image_id"] for e in examples],
            **({"negative_ids": torch.stack([e["negative_ids"] for e in examples])} if self.hard_negatives else {}),
        }


class CaptionPairDataModule(ShardDataModule):
    """``ShardDataModule`` streaming image-caption pairs for the contrastive tower stage."""

    def __init__(self, hard_negatives: bool = False, **kwargs) -> None:
        """
        Args:
            hard_negatives: Give each pair a caption of the scene with one shape swapped (ShapeWorld only);
                the contrastive task then also learns to prefer the true caption to it.
            **kwargs: Everything ``ShardDataModule`` takes.
        """
        super().__init__(**kwargs)
        self.hard_negatives = hard_negatives

    def make_encoder(self, formatter: ConversationFormatter, image_transform: Callable) -> SampleEncoder:
        tokenizer = open_clip.get_tokenizer(self.model_config.vision_model)
        return CaptionPairEncoder(formatter, image_transform, tokenizer, seed=self.data_seed,
                                  hard_negatives=self.hard_negatives)
