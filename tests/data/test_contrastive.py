"""Caption pairs for the clip stage: the tower's transform, open_clip tokens, hard negatives that swap a shape."""

from __future__ import annotations

import open_clip
import pytest
import torch

from dress_lightning.conversation import ConversationFormatError
from dress_lightning.data.contrastive import CaptionPairEncoder
from dress_lightning.data.shapeworld import captions, generate_sample
from dress_lightning.models.vision import describe_vision_tower
from dress_lightning.tasks.losses import hard_negative_loss


@pytest.fixture(scope="module")
def encoder() -> CaptionPairEncoder:
    spec = describe_vision_tower("dress-tiny-vit")
    return CaptionPairEncoder(None, spec.image_transform, open_clip.get_tokenizer("dress-tiny-vit"), seed=0,
                              hard_negatives=True)


def test_a_pair_is_the_image_and_one_of_its_captions(encoder):
    sample = generate_sample("train", 0, 3)
    example = encoder(sample)
    assert example["pixel_values"].shape == (3, 64, 64)
    tokenizer = open_clip.get_tokenizer("dress-tiny-vit")
    assert any(torch.equal(example["input_ids"], tokenizer([c])[0]) for c in sample.record["annotations"]["captions"])


def test_hard_negative_differs_from_the_scene_in_one_shape_only(encoder):
    sample = generate_sample("train", 0, 5)
    objects = sample.record["annotations"]["objects"]
    for style in range(3):
        negative = encoder.shape_swapped_caption(sample, style)
        assert negative != captions(objects)[style]
        # Some one-object change of shape gives exactly this caption.
        candidates = {captions([{**o, "shape": s} if j == i else o for j, o in enumerate(objects)])[style]
                      for i in range(len(objects)) for s in ("circle", "square", "triangle", "diamond")
                      if s != objects[i]["shape"]}
        assert negative in candidates


def test_hard_negatives_need_shapeworld_objects(encoder):
    sample = generate_sample("train", 0, 5)
    sample.record["annotations"]["objects"] = [{"category": "dog", "box": [0, 0, 1, 1]}]
    with pytest.raises(ConversationFormatError, match="ShapeWorld"):
        encoder(sample)


def test_hard_negative_loss_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # Image 0: logits (s*1, s*0) -> -log(e^s / (e^s + 1)); image 1: a tie -> log 2.
    scale = torch.tensor(2.0)
    expected = (torch.log1p(torch.exp(-scale)) + torch.log(torch.tensor(2.0))) / 2
    assert torch.allclose(hard_negative_loss(images, texts, negatives, scale), expected)
