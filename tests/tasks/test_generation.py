"""predict: prompt batches from real shards, batched generation through the task."""

import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.tasks import GenerationSettings, SFTTask


@pytest.fixture(scope="module")
def prompt_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    assert main(["data", "shapeworld", "--out", str(out), "--split", "val", "--samples", "6", "--seed", "1"]) == 0
    return out


def test_prompt_batches_are_left_padded_first_user_turns(prompt_shards):
    dm = ShardDataModule(predict_shards=str(prompt_shards), batch_size=3, num_workers=0)
    dm.setup()
    batch = next(iter(dm.predict_dataloader()))
    assert (batch["attention_mask"][:, -1] == 1).all()
    for row, sample in enumerate(batch["samples"]):
        expected = dm.encoder.formatter.encode_prompt(sample["record"]["conversation"][:1])
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, -n:].tolist() == expected
    assert batch["stop_token_ids"] == [dm.encoder.formatter.tokenizer.eos_token_id]


def test_task_generates_num_samples_responses_per_prompt(prompt_shards):
    dm = ShardDataModule(predict_shards=str(prompt_shards), batch_size=3, num_workers=0)
    dm.setup()
    task = SFTTask(generation=GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=2))
    task.configure_model()
    batch = next(iter(dm.predict_dataloader()))
    torch.manual_seed(0)
    outputs = task.predict_step(batch, 0)
    assert [o["id"] for o in outputs] == batch["ids"]
    assert all(len(o["responses"]) == 2 and all(isinstance(r, str) for r in o["responses"]) for o in outputs)
