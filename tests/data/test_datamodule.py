"""The streaming pipeline on real ShapeWorld shards: splits, epochs, skips, padding, model compatibility."""

import io
import multiprocessing
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from dress_lightning.cli import main
from dress_lightning.conversation import IGNORE_INDEX
from dress_lightning.data.datamodule import ShardDataModule, ensure_shapeworld_shards
from dress_lightning.data.pipeline import EpochDataLoader, Source, StreamPosition, build_pipeline
from dress_lightning.data.schema import decode_sample
from dress_lightning.data.shapeworld import ShapeWorldShards

SAMPLES, SHARD_SIZE = 48, 6


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    args = ["data", "shapeworld", "--out", str(out), "--split", "train", "--samples", str(SAMPLES), "--seed", "3",
            "--shard-size", str(SHARD_SIZE)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def datamodule(shard_dir):
    dm = ShardDataModule(train_shards=str(shard_dir), val_shards=str(shard_dir), batch_size=4, num_workers=0)
    dm.setup()
    return dm


def _ids(loader):
    return [sample_id for batch in loader for sample_id in batch["ids"]]


def _rank_loader(dm, shard_dir, rank, world_size, num_workers=2, **kwargs):
    position = StreamPosition(rank=rank, world_size=world_size, seed=0)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    pipeline = build_pipeline([Source(urls, dm.encoder)], position, batch_size=4, shuffle=True,
                              shuffle_buffer=10, **kwargs)
    return EpochDataLoader(pipeline, position, num_workers=num_workers)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(datamodule, shard_dir):
    loaders = [_rank_loader(datamodule, shard_dir, rank, 2) for rank in range(2)]
    for _ in range(2):  # two epochs: each is a complete, duplicate-free pass
        seen = Counter(sample_id for loader in loaders for sample_id in _ids(loader))
        assert len(seen) == SAMPLES and set(seen.values()) == {1}


def test_each_epoch_reshuffles_deterministically(datamodule, shard_dir):
    loader = _rank_loader(datamodule, shard_dir, 0, 1, num_workers=0)
    first, second = _ids(loader), _ids(loader)
    assert sorted(first) == sorted(second) and first != second
    again = _rank_loader(datamodule, shard_dir, 0, 1, num_workers=0)
    assert _ids(again) == first  # same seed, same epoch: same order


def test_resampled_mode_has_explicit_epoch_length(shard_dir):
    dm = ShardDataModule(train_shards=str(shard_dir), batch_size=4, num_workers=2, resampled=True, epoch_length=40)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 * 5  # ceil(40 / (2 workers x 4)) batches per worker
    with pytest.raises(ValueError, match="epoch_length"):
        ShardDataModule(train_shards=str(shard_dir), resampled=True)


def test_too_few_shards_for_readers_fails_clearly(shard_dir):
    dm = ShardDataModule(train_shards=str(shard_dir / "shapeworld-train-000000.tar"), num_workers=2)
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 readers"):
        dm.train_dataloader()


def test_batches_feed_the_model(datamodule, shard_dir, tiny_model):
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0  # pad_to_multiple_of
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    loss = tiny_model(**inputs).loss
    assert torch.isfinite(loss)


def test_images_use_the_vision_tower_transform(datamodule, shard_dir, tiny_model):
    sample = next(iter(decode_sample(raw) for raw in _raw_samples(shard_dir / "shapeworld-train-000000.tar")))
    encoded = datamodule.encoder(sample)
    expected = tiny_model.vision.image_transform(Image.open(io.BytesIO(sample.image)).convert("RGB"))
    torch.testing.assert_close(encoded["pixel_values"], expected)
    assert encoded["input_ids"].tolist().count(tiny_model.image_token_id) == tiny_model.num_image_tokens


def _raw_samples(path):
    with tarfile.open(path) as tar:
        members = {}
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(members.values())


def test_corrupt_samples_are_skipped_and_counted(shard_dir, tmp_path):
    # Shard 1: truncated mid-member. Shard 2: one sample with broken JSON, one with broken image bytes.
    source = shard_dir / "shapeworld-train-000001.tar"
    with tarfile.open(source) as tar:
        cut_member = tar.getmembers()[7]  # the 4th sample's second member
    cut = cut_member.offset_data + cut_member.size // 2
    (tmp_path / "a-000000.tar").write_bytes(source.read_bytes()[:cut])
    samples = _raw_samples(shard_dir / "shapeworld-train-000002.tar")
    samples[0]["json"] = b"{not json"
    samples[1]["png"] = b"not an image"
    with tarfile.open(tmp_path / "a-000001.tar", "w") as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    dm = ShardDataModule(train_shards=str(tmp_path), batch_size=4, num_workers=0)
    ids = []
    for batch in dm.train_dataloader():
        ids += batch["ids"]
    # The cut sample arrives without its second member (invalid), then the tar read fails (unreadable).
    assert dm.skipped["invalid sample"] == 2  # the cut sample + the broken JSON
    assert dm.skipped["unreadable image"] == 1
    assert sum(n for reason, n in dm.skipped.items() if reason.startswith("unreadable (")) >= 1
    assert len(ids) == 3 + SHARD_SIZE - 2  # 3 whole samples before the cut + the 4 good ones


def test_length_grouping_reduces_padding(shard_dir):
    def padding_fraction(group_by_length):
        dm = ShardDataModule(train_shards=str(shard_dir), batch_size=4, num_workers=0, pad_to_multiple_of=1,
                             group_by_length=group_by_length)
        masks = [batch["attention_mask"] for batch in dm.train_dataloader()]
        return sum((m == 0).sum().item() for m in masks) / sum(m.numel() for m in masks)

    assert padding_fraction(6) < padding_fraction(0)


def test_pipe_urls_and_brace_patterns(datamodule, shard_dir):
    first = shard_dir / "shapeworld-train-000000.tar"
    dm = ShardDataModule(val_shards=f"pipe:cat {first}", batch_size=4, num_workers=0)
    assert len(_ids(dm.val_dataloader())) == SHARD_SIZE
    pattern = str(shard_dir / "shapeworld-train-{000000..000001}.tar")
    dm = ShardDataModule(val_shards=pattern, batch_size=4, num_workers=0)
    assert len(_ids(dm.val_dataloader())) == 2 * SHARD_SIZE


def test_the_data_order_follows_the_run_seed_unless_set(shard_dir, monkeypatch):
    """``fit --seed_everything 1`` draws another order than seed 0 (the experiment's seeds vary SFT training too)."""

    def order(**kwargs):
        dm = ShardDataModule(train_shards=str(shard_dir), batch_size=4, num_workers=0, **kwargs)
        dm.setup()
        return _ids(dm.train_dataloader())

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    run_seed_0 = order()
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    run_seed_1 = order()
    assert sorted(run_seed_0) == sorted(run_seed_1) and run_seed_0 != run_seed_1
    assert order(seed=0) == run_seed_0  # an explicit data seed wins over the run's


def _generate_after(barrier, out, spec):
    barrier.wait()  # both processes start generating at the same moment
    ensure_shapeworld_shards(out, spec, poll_seconds=0.05)


def test_two_processes_generating_the_same_shapeworld_shards_write_them_once(tmp_path):
    """Two jobs on a fresh clone used to write the same .tar.partial files and crash each other."""
    spec = ShapeWorldShards(split="val", samples=60, seed=1, shard_size=10)
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_generate_after, args=(barrier, shared, spec)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    ensure_shapeworld_shards(alone, spec)
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert not list(tmp_path.glob("*.generating")) and not list(shared.glob("*.partial"))
    for shard in sorted(alone.glob("*.tar")):
        assert (shared / shard.name).read_bytes() == shard.read_bytes()
