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
