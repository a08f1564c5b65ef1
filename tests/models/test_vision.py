import open_clip
import pytest
import torch

from dress_lightning.models import build_vision_tower, describe_vision_tower


def test_patch_tokens_shape_and_layer_selection():
    torch.manual_seed(0)
    tower = build_vision_tower("dress-tiny-vit", layer=-1)
    images = torch.randn(3, 3, *tower.image_size)
    tokens = tower(images)
    grid = tower.image_size[0] // 8
    assert tokens.shape == (3, grid * grid, 128) == (3, tower.num_patches, tower.hidden_size)

    # layer -1 without ln_post equals the last block's output; -2 stops one block earlier.
    earlier = build_vision_tower("dress-tiny-vit", layer=-2)
    earlier.load_state_dict(tower.state_dict())
    assert not torch.allclose(earlier(images), tokens)
    blocks = tower.visual.transformer.resblocks
    x = tower.visual._embeds(images)
    for block in blocks[:-1]:
        x = block(x)
    torch.testing.assert_close(earlier(images), x[:, 1:])  # CLS dropped


def test_exposes_open_clip_image_transform():
    tower = build_vision_tower("dress-tiny-vit")
    from PIL import Image

    pixels = tower.image_transform(Image.new("RGB", (100, 80), "red"))
    assert pixels.shape == (3, *tower.image_size)
    # open_clip normalises with the CLIP mean/std: pure red maps to (1 - mean) / std on channel 0.
    assert pixels[0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-4)


def test_frozen_tower_builds_no_graph():
    tower = build_vision_tower("dress-tiny-vit")
    tower.requires_grad_(False)
    assert not tower(torch.randn(1, 3, 64, 64)).requires_grad
    tower.requires_grad_(True)
    assert tower(torch.randn(1, 3, 64, 64)).requires_grad


def test_local_checkpoint_loads_by_path(tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model("dress-tiny-vit")
    path = tmp_path / "tiny_clip.pt"
    torch.save(source.state_dict(), path)

    tower = build_vision_tower("dress-tiny-vit", pretrained=str(path))
    for name, tensor in source.visual.state_dict().items():
        torch.testing.assert_close(tower.visual.state_dict()[name], tensor)


def test_unknown_model_and_bad_pretrained_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="Unknown open_clip model 'ViT-Nope'.*ViT-L-14-336"):
        build_vision_tower("ViT-Nope")
    with pytest.raises(ValueError, match="neither a local checkpoint file nor a pretrained tag"):
        build_vision_tower("dress-tiny-vit", pretrained=str(tmp_path / "missing.pt"))


def test_describe_matches_the_built_tower_without_weights():
    spec = describe_vision_tower("dress-tiny-vit", layer=-2)
    tower = build_vision_tower("dress-tiny-vit", layer=-2)
    assert (spec.num_patches, spec.hidden_size, spec.image_size) == (64, 128, (64, 64))
    assert tower(torch.randn(1, 3, 64, 64)).shape == (1, spec.num_patches, spec.hidden_size)


@pytest.mark.parametrize("name, tokens, width", [("ViT-L-14-336", 576, 1024), ("EVA01-g-14", 256, 1408)])
def test_describe_real_towers_on_meta(name, tokens, width):
    # The real DRESS / LLaVA-1.5 towers, described offline without allocating their weights.
    spec = describe_vision_tower(name, pretrained="openai" if name == "ViT-L-14-336" else None)
    assert (spec.num_patches, spec.hidden_size) == (tokens, width)


def test_random_towers_are_seeded_so_checkpoints_can_omit_them():
    torch.manual_seed(1)
    first = build_vision_tower("dress-tiny-vit").state_dict()
    torch.manual_seed(2)
    second = build_vision_tower("dress-tiny-vit").state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor)


def test_convolutional_tower_gives_its_feature_map_cells_as_tokens():
    # open_clip's ModifiedResNet (the RN50 family): stage -1 of the 96-px tiny preset is a 3x3 map of 512
    # channels, one token per cell in row-major order; stage -2 is the 6x6 map before it.
    tower = build_vision_tower("dress-tiny-rn", layer=-1).eval()
    assert (tower.num_patches, tower.hidden_size) == (9, 512)
    assert (describe_vision_tower("dress-tiny-rn", layer=-2).num_patches,
            describe_vision_tower("dress-tiny-rn", layer=-2).hidden_size) == (36, 256)
    images = torch.randn(2, 3, *tower.image_size)
    visual = tower.visual
    x = visual.stem(images)
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = stage(x)
    torch.testing.assert_close(tower(images), x.flatten(2).transpose(1, 2))
    assert torch.equal(tower(images)[:, 1], x[:, :, 0, 1])  # token 1 = top row, middle cell


def test_frozen_convolutional_tower_keeps_its_batchnorm_statistics_in_training_mode():
    tower = build_vision_tower("dress-tiny-rn", layer=-1)
    tower.requires_grad_(False)
    before = {k: v.clone() for k, v in tower.visual.state_dict().items() if "running" in k}
    tower.train()
    assert not tower.visual.training
    single, batch = torch.randn(1, 3, 96, 96), torch.randn(4, 3, 96, 96)
    alone = tower(single)
    together = tower(torch.cat([single, batch]))[:1]
    torch.testing.assert_close(alone, together)  # running statistics: an image's tokens ignore its batch
    after = {k: v for k, v in tower.visual.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    tower.requires_grad_(True)
    tower.train()
    assert tower.visual.training  # a trained tower uses batch statistics, as open_clip trains it


def test_convolutional_tower_runs_channels_last_with_the_same_tokens():
    # oneDNN's fast layout for convolutions, for the images only: the weights stay contiguous (FSDP shards only
    # contiguous parameters), and the tokens are those of the default layout up to float rounding.
    tower = build_vision_tower("dress-tiny-rn", layer=-1).eval()
    assert tower.memory_format == torch.channels_last
    assert all(p.is_contiguous() for p in tower.parameters())
    images = torch.randn(4, 3, *tower.image_size)
    default_layout = build_vision_tower("dress-tiny-rn", layer=-1).eval()
    default_layout.memory_format = torch.contiguous_format
    torch.testing.assert_close(tower(images), default_layout(images), rtol=1e-4, atol=1e-5)
    # A ViT's only convolution is its patch embedding: it keeps the default layout.
    assert build_vision_tower("dress-tiny-vit").memory_format == torch.contiguous_format
