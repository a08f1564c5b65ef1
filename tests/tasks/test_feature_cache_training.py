"""cache_image_features: a task trains on cached features of real shard batches, with the same loss."""

import lightning as L
import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.tasks import SFTTask


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    args = ["data", "shapeworld", "--out", str(out), "--split", "train", "--samples", "6", "--seed", "2",
            "--shard-size", "6"]
    assert main(args) == 0
    return out


def _datamodule(shards):
    dm = ShardDataModule(train_shards=str(shards), batch_size=3, num_workers=0, shuffle_buffer=1)
    dm.setup()
    return dm


def test_cached_loss_equals_uncached_loss_on_a_shard_batch(shards):
    batch = next(iter(_datamodule(shards).train_dataloader()))
    assert len(set(batch["image_ids"])) == len(batch["ids"])
    losses = []
    for cached in (False, True):
        task = SFTTask(cache_image_features=cached)
        torch.manual_seed(0)  # the projector's init draws from the global RNG
        task.configure_model()
        losses.append(task.compute_loss(batch))
    torch.testing.assert_close(losses[1], losses[0])


def test_second_epoch_is_served_from_the_cache(shards):
    task = SFTTask(cache_image_features=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=_datamodule(shards))
    assert (task.feature_cache.misses, task.feature_cache.hits, len(task.feature_cache)) == (6, 6, 6)


def test_refused_when_the_tower_trains():
    from dress_lightning.models import VisionLanguageConfig

    task = SFTTask(model=VisionLanguageConfig(freeze_vision=False), cache_image_features=True)
    with pytest.raises(ValueError, match="frozen vision tower"):
        task.configure_model()


def test_the_cache_bound_comes_from_the_config_and_entries_live_on_the_cpu(shards):
    task = SFTTask(cache_image_features=True, feature_cache_max_images=2)
    task.configure_model()
    batch = next(iter(_datamodule(shards).train_dataloader()))  # 3 distinct images
    task.compute_loss(batch)
    assert task.feature_cache.max_images == 2 and len(task.feature_cache) == 2
    assert {features.device.type for features in task.feature_cache._features.values()} == {"cpu"}
