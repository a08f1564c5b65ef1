"""The clip stage: contrastive pretraining of the tower learns, and its export is the tower later stages load."""

from __future__ import annotations

import csv
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from dress_lightning.cli import main
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.models.vision import build_vision_tower, image_memory_format
from dress_lightning.tasks import ContrastiveTowerTask

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    """A short real run of configs/clip.yaml (the tiny ResNet tower): 1280 train pairs, 60 steps, retrieval among
    100 val pairs. The ResNet leaves chance (loss ln(64)) within some 20 steps; the ViT needed 200.
    """
    tmp = tmp_path_factory.mktemp("clip")
    assert main([
        "fit", "-c", str(ROOT / "configs/clip.yaml"),
        "--trainer.max_steps", "60", "--trainer.val_check_interval", "60", "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "10", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp),
        "--trainer.callbacks.init_args.dirpath", str(tmp / "checkpoints"),
        "--model.init_args.export_path", str(tmp / "tower.safetensors"),
        "--data.init_args.train_shards", str(tmp / "train"), "--data.init_args.val_shards", str(tmp / "val"),
        "--data.init_args.train_shapeworld", '{"split": "train", "samples": 1280, "seed": 0, "shard_size": 640}',
        "--data.init_args.val_shapeworld", '{"split": "val", "samples": 100, "seed": 0, "shard_size": 100}',
        "--data.init_args.batch_size", "64", "--data.init_args.num_workers", "0",
        "--data.init_args.shuffle_buffer", "256",
    ]) == 0
    return tmp


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_contrastive_loss_falls_and_retrieval_beats_chance(clip_run):
    rows = _metrics(clip_run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0] - 0.5, losses  # starts at ln(64) = 4.16: chance among the batch
    retrieval = [float(r["val/image_to_caption@100"]) for r in rows if r.get("val/image_to_caption@100")]
    # Chance is 1 in 100: a few hits by luck at most among 100 unseen images.
    assert retrieval[-1] >= 0.05, retrieval


def test_export_is_the_tower_the_later_stages_load(clip_run):
    path = clip_run / "tower.safetensors"
    trained = open_clip.create_model("dress-tiny-rn", pretrained=str(path)).visual.eval()
    random = build_vision_tower("dress-tiny-rn", None, layer=-1).eval()
    tower = build_vision_tower("dress-tiny-rn", str(path), layer=-1).eval()
    images = torch.randn(2, 3, 96, 96)
    layout = image_memory_format(trained)  # the layout the tower runs its images in (channels-last): bit-equal tokens
    expected = trained.forward_intermediates(images.contiguous(memory_format=layout), indices=[-1],
                                             intermediates_only=True)["image_intermediates"][0]
    assert torch.equal(tower(images), expected.flatten(2).transpose(1, 2))
    assert not torch.allclose(random(images), tower(images))
    assert (clip_run / "tower.json").is_file()


def test_the_summary_after_the_clip_stage_points_at_the_tower_not_at_chat():
    config = VisionLanguageConfig(vision_model="dress-tiny-rn", vision_layer=-1)
    task = ContrastiveTowerTask(model=config, export_path="runs/clip/tower.safetensors")
    commands = task.next_commands("runs/clip/checkpoints/last.ckpt")
    # the layer the later stages read: configs/clip.yaml sets the one configs/sft.yaml reads
    layers = [yaml.safe_load((ROOT / f"configs/{name}.yaml").read_text())["model"]["init_args"]["model"]["vision_layer"]
              for name in ("clip", "sft")]
    assert layers == [-1, -1]
    assert commands[0] == ("python -m dress_lightning probe-tower --vision-model dress-tiny-rn "
                           "--vision-pretrained runs/clip/tower.safetensors --vision-layer=-1")
    assert not any(" chat " in c or " evaluate " in c for c in commands)
    assert ContrastiveTowerTask(export_path=None).next_commands("last.ckpt") == []
