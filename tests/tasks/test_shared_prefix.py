"""The system prompt run once per batch (``share_prompt_prefix``): the same loss and gradients as running it in
every row, on real ShapeWorld batches through the data module, the task and Llama."""

from itertools import islice

import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.models.vlm import MIN_SHARED_PREFIX
from dress_lightning.tasks import SFTTask


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapeworld")
    assert main(["data", "shapeworld", "--out", str(out), "--split", "train", "--samples", "24", "--seed", "3",
                 "--shard-size", "8"]) == 0
    dm = ShardDataModule(train_shards=str(out), batch_size=8, num_workers=0, seed=1)
    return list(islice(dm.train_dataloader(), 3))


def _forwards(task):
    """(rows, positions) of each forward of the language model, recorded by a hook."""
    calls = []
    task.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    return calls


def test_the_shared_prefix_gives_the_loss_and_gradients_of_whole_rows(batches, scramble):
    task = SFTTask()
    task.configure_model()
    scramble(task.model)  # attention that matters: random, not near-uniform
    calls = _forwards(task)
    for batch in batches:
        rows, length = batch["input_ids"].shape
        losses, grads = [], []
        for share in (False, True):
            task.share_prompt_prefix = share
            task.model.zero_grad()
            calls.clear()
            loss = task.compute_loss(batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters() if p.grad is not None]))
        shared = calls[0][1]  # the vicuna_v1 system prompt, once
        assert shared >= MIN_SHARED_PREFIX and calls == [(1, shared), (rows, length - shared)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert (grads[1] - grads[0]).norm() < 1e-4 * grads[0].norm()  # fp32 sums in another order


def test_a_batch_whose_prefix_holds_a_labelled_token_runs_whole(batches):
    """The prefix ends before the first position whose logits the loss reads: labels from the first token on
    leave nothing to share."""
    task = SFTTask()
    task.configure_model()
    calls = _forwards(task)
    batch = dict(batches[0])
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    task.compute_loss(batch)
    assert calls == [tuple(batch["input_ids"].shape)]
