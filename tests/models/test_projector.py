import pytest
import torch

from dress_lightning.models import PROJECTORS, build_projector


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_projector_maps_vision_dim_to_text_dim(name):
    projector = build_projector(name, vision_dim=12, text_dim=20)
    assert projector(torch.randn(2, 5, 12)).shape == (2, 5, 20)


def test_mlp2x_gelu_is_the_llava_layout():
    layers = [type(m).__name__ for m in build_projector("mlp2x_gelu", 4, 8)]
    assert layers == ["Linear", "GELU", "Linear"]


def test_unknown_projector_lists_valid_names():
    with pytest.raises(ValueError, match="linear, mlp2x_gelu"):
        build_projector("qformer", 4, 8)


def test_position_embedding_adds_one_learned_vector_per_slot_before_the_projector():
    projector = build_projector("linear", 12, 20, position_embedding_tokens=5)
    slots, linear = projector
    tokens = torch.randn(2, 5, 12)
    torch.testing.assert_close(projector(tokens), linear(tokens + slots.weight[None]))
    assert slots.weight.std() > 0.3  # at the scale of the tiny tower's features, not near zero


def test_factory_sizes_the_position_embedding_to_the_towers_tokens_and_it_trains_with_the_projector():
    from dress_lightning.models import VisionLanguageConfig, build_vision_language_model

    config = VisionLanguageConfig(vision_model="dress-tiny-rn", vision_layer=-1, image_position_embedding=True)
    model = build_vision_language_model(config)
    slots = model.projector[0].weight
    assert slots.shape == (model.num_image_tokens, model.vision.hidden_size) == (9, 512)
    assert slots.requires_grad
    assert isinstance(build_vision_language_model(VisionLanguageConfig(vision_model="dress-tiny-rn", vision_layer=-1))
                      .projector, torch.nn.Linear)  # off by default: checkpoints keep their key names
