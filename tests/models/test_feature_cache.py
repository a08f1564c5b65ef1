"""The frozen-tower feature cache: same logits as the uncached model, and no stale features served."""

import pytest
import torch

from dress_lightning.models import (
    ImageTokenMismatchError,
    StaleFeatureCacheError,
    VisionFeatureCache,
    VisionLanguageConfig,
    build_vision_language_model,
)
from dress_lightning.special_tokens import IMAGE_TOKEN
from dress_lightning.tasks.losses import masked_lm_loss


def _batch(tokenizer, model, texts):
    tokenizer.padding_side = "right"
    batch = tokenizer([IMAGE_TOKEN * model.num_image_tokens + "\n" + t for t in texts], return_tensors="pt",
                      padding=True)
    labels = batch.input_ids.masked_fill(batch.input_ids == model.image_token_id, -100)
    labels = labels.masked_fill(batch.attention_mask == 0, -100)
    return batch.input_ids, batch.attention_mask, labels


def test_cached_forward_matches_uncached_logits_and_loss(tiny_model, tiny_tokenizer):
    input_ids, attention_mask, labels = _batch(tiny_tokenizer, tiny_model, ["How many circles?", "Describe it."])
    pixel_values = torch.randn(2, 3, 64, 64)
    cache = VisionFeatureCache(tiny_model.vision)
    expected = tiny_model(input_ids, attention_mask, pixel_values=pixel_values).logits
    for _ in range(2):  # first call fills the cache, the second is served from it
        logits = tiny_model(input_ids, attention_mask, image_features=cache(pixel_values, ["a", "b"])).logits
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(masked_lm_loss(logits, labels), masked_lm_loss(expected, labels))
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)


def test_hits_skip_the_tower_and_gradients_reach_the_projector(tiny_model, tiny_tokenizer, monkeypatch):
    input_ids, attention_mask, labels = _batch(tiny_tokenizer, tiny_model, ["Is there a square?"])
    cache = VisionFeatureCache(tiny_model.vision)
    cache(torch.randn(1, 3, 64, 64), ["x"])
    monkeypatch.setattr(tiny_model.vision, "forward", lambda *a: pytest.fail("the tower ran on a cache hit"))
    features = cache(torch.randn(1, 3, 64, 64), ["x"])
    masked_lm_loss(tiny_model(input_ids, attention_mask, image_features=features).logits, labels).backward()
    assert all(p.grad is not None for p in tiny_model.projector.parameters())


def test_refuses_a_trainable_tower(tiny_tokenizer):
    model = build_vision_language_model(VisionLanguageConfig(freeze_vision=False), tiny_tokenizer)
    with pytest.raises(ValueError, match="frozen vision tower"):
        VisionFeatureCache(model.vision)


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer_step", "unfreeze"])
def test_changed_tower_is_refused_not_served_stale(tiny_model, change):
    cache = VisionFeatureCache(tiny_model.vision)
    pixel_values = torch.randn(1, 3, 64, 64)
    cache(pixel_values, ["a"])
    visual = tiny_model.vision.visual
    if change == "load_state_dict":
        visual.load_state_dict({k: v + 1 for k, v in visual.state_dict().items()})
    elif change == "optimizer_step":
        with torch.no_grad():
            visual.conv1.weight.add_(0.1)
    else:
        visual.requires_grad_(True)
    with pytest.raises(StaleFeatureCacheError):
        cache(pixel_values, ["a"])


def test_model_takes_pixels_or_features_of_the_right_shape(tiny_model, tiny_tokenizer):
    input_ids, attention_mask, _ = _batch(tiny_tokenizer, tiny_model, ["Where is the triangle?"])
    pixel_values = torch.randn(1, 3, 64, 64)
    features = tiny_model.vision(pixel_values)
    with pytest.raises(ValueError, match="not both"):
        tiny_model(input_ids, attention_mask, pixel_values=pixel_values, image_features=features)
    with pytest.raises(ImageTokenMismatchError, match="another tower"):
        tiny_model(input_ids, attention_mask, image_features=features[:, :-1])


def test_max_images_bounds_the_cache(tiny_model):
    cache = VisionFeatureCache(tiny_model.vision, max_images=1)
    pixel_values = torch.randn(2, 3, 64, 64)
    out = cache(pixel_values, ["a", "b"])
    torch.testing.assert_close(out, tiny_model.vision(pixel_values))
    assert len(cache) == 1
