"""Padding-free packing (``data.pack_sequences``): the row layout by hand, and the loss of packed batches
equal to the unpacked loss on the same samples, through the real data module, task and Llama."""

from itertools import islice

import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.conversation import IGNORE_INDEX
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.encoders import pack
from dress_lightning.data.dpo import DPODataModule
from dress_lightning.tasks import SFTTask

PAD = 0


def _example(name: str, length: int) -> dict:
    ids = torch.arange(1, length + 1) + 100 * len(name)
    labels = ids.clone()
    labels[:2] = IGNORE_INDEX  # a prompt of two tokens
    return {"id": name, "input_ids": ids, "labels": labels, "pixel_values": torch.full((3, 2, 2), float(length)),
            "image_id": f"img-{name}", "num_truncated": 0}


def test_pack_fills_rows_first_fit_longest_first():
    examples = [_example("a", 5), _example("bb", 3), _example("ccc", 2), _example("dddd", 4)]
    batch = pack(examples, PAD, row_length=5)
    # 14 tokens: 3 rows; longest first into the emptiest row: a | dddd | bb + ccc.
    assert batch["ids"] == ["a", "dddd", "bb", "ccc"]
    assert batch["images_per_row"].tolist() == [1, 1, 2]
    assert batch["image_ids"] == ["img-a", "img-dddd", "img-bb", "img-ccc"]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 4.0, 3.0, 2.0]
    assert batch["input_ids"].tolist()[2] == [*examples[1]["input_ids"].tolist(), *examples[2]["input_ids"].tolist()]
    assert batch["input_ids"][1, 4].item() == PAD and batch["labels"][1, 4].item() == IGNORE_INDEX
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1] * 5]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 203, IGNORE_INDEX, IGNORE_INDEX]


def test_pack_balances_rows_and_rounds_them_up():
    examples = [_example("a", 5), _example("bb", 3), _example("ccc", 2), _example("dddd", 4)]
    batch = pack(examples, PAD, row_length=7, pad_to_multiple_of=4)  # 2 rows of 7 tokens, padded to 8
    assert batch["ids"] == ["a", "ccc", "dddd", "bb"]
    assert batch["images_per_row"].tolist() == [2, 2]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [7, 7]
    # One row of 14 or two of 7 hold the same positions: the tie goes to the shorter rows (less attention).
    assert pack(examples, PAD, row_length=100)["input_ids"].shape == (2, 7)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    assert main(["data", "shapeworld", "--out", str(out), "--split", "train", "--samples", "32", "--seed", "5",
                 "--shard-size", "8"]) == 0
    return out


def _batches(shards, **options):
    dm = ShardDataModule(train_shards=str(shards), batch_size=8, num_workers=0, seed=1, **options)
    return list(islice(dm.train_dataloader(), 3))


@pytest.mark.parametrize("pack_length", [384, 1024])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(shards, scramble, pack_length):
    task = SFTTask()
    task.configure_model()
    scramble(task.model)  # a model whose attention matters: random, not near-uniform
    padded = _batches(shards)
    packed = _batches(shards, pack_sequences=True, pack_length=pack_length)
    fewer_positions = 0
    for unpacked_batch, packed_batch in zip(padded, packed, strict=True):
        assert sorted(packed_batch["ids"]) == sorted(unpacked_batch["ids"])  # packing moves samples, never swaps them
        assert packed_batch["attention_mask"].sum() == unpacked_batch["attention_mask"].sum()
        assert packed_batch["input_ids"].numel() <= unpacked_batch["input_ids"].numel()
        fewer_positions += packed_batch["input_ids"].numel() < unpacked_batch["input_ids"].numel()
        losses, grads = [], []
        for batch in (unpacked_batch, packed_batch):
            task.model.zero_grad()
            loss = task.compute_loss(batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters() if p.grad is not None]))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        # fp32 sums in another order (longer rows): elementwise noise near zero, 2e-5 of the norm here.
        assert (grads[1] - grads[0]).norm() < 1e-4 * grads[0].norm()
    assert fewer_positions > 0


def test_attention_does_not_cross_packed_samples(shards, scramble):
    """The control that makes the test above able to fail: one causal run over the whole row changes the loss."""
    task = SFTTask()
    task.configure_model()
    scramble(task.model)
    batch = next(b for b in _batches(shards, pack_sequences=True, pack_length=1024))
    crossing = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    assert not torch.allclose(task.compute_loss(batch), task.compute_loss(crossing))


def test_batches_with_paired_rows_refuse_packing(judged_nlf_shards, tmp_path):
    dm = DPODataModule(nlf_shards=str(judged_nlf_shards), derived_dir=str(tmp_path), batch_size=2, num_workers=0,
                       epoch_length=8, pack_sequences=True)
    dm.prepare_data()
    with pytest.raises(ValueError, match="pack_sequences"):
        iter(dm.train_dataloader())
