"""A crafted pickle checkpoint given to every entry point that loads one: nothing in it runs, a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dress_lightning.checkpoints import UnsafeCheckpointError
from dress_lightning.cli import main
from dress_lightning.inference import load_task

ROOT = Path(__file__).resolve().parents[2]


class RunsACommand:
    """Unpickling this calls ``os.system``: the attack a ``.ckpt`` can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that creates ``marker`` when unpickled without weights_only, and the marker's path."""
    marker = tmp_path / "code-ran"
    checkpoint = {"state_dict": {}, "hyper_parameters": {"_class_path": "dress_lightning.tasks.SFTTask"},
                  "payload": RunsACommand(marker)}
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def _fit_args(policy_checkpoint: Path, tmp_path: Path, *extra: str) -> list[str]:
    shards = policy_checkpoint.parent.parent  # the session policy's ShapeWorld shards, already written
    return ["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ck"),
            "--data.init_args.train_shards", str(shards / "train"), "--data.init_args.val_shards", str(shards / "val"),
            *extra]


def test_load_task_refuses_a_pickle_payload(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="Refused to load checkpoint .*crafted.ckpt.*system"):
        load_task(str(path))
    assert not marker.exists()


def test_load_task_refuses_a_task_class_outside_the_project(tmp_path):
    path = tmp_path / "other-class.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "subprocess.Popen"}}, path)
    with pytest.raises(UnsafeCheckpointError, match="names the task class 'subprocess.Popen'"):
        load_task(str(path))


def test_evaluate_refuses_it(crafted, capsys):
    path, marker = crafted
    assert main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "--checkpoint", str(path)]) == 2
    assert "Refused to load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_feedback_rollout_refuses_it(crafted, tmp_path, capsys):
    path, marker = crafted
    args = ["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--checkpoint", str(path),
            "--prompts", str(tmp_path / "prompts"), "--prompts_shapeworld.samples", "4",
            "--prompts_shapeworld.shard_size", "4", "--out", str(tmp_path / "nlf"), "--num_workers", "0"]
    assert main(args) == 2
    assert "Refused to load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_fit_refuses_it_as_init_checkpoint(crafted, policy_checkpoint, tmp_path, capsys):
    path, marker = crafted
    assert main(_fit_args(policy_checkpoint, tmp_path, "--model.init_args.init_checkpoint", str(path))) == 2
    assert "Refused to load model.init_args.init_checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_fit_refuses_it_as_ckpt_path(crafted, policy_checkpoint, tmp_path, capsys):
    path, marker = crafted
    assert main(_fit_args(policy_checkpoint, tmp_path, "--ckpt_path", str(path))) == 2
    assert "Refused to load --ckpt_path" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(SystemExit, match="weights_only=True only"):
        main(_fit_args(policy_checkpoint, tmp_path, "--weights_only", "false"))


def test_project_checkpoints_still_load(policy_checkpoint):
    assert type(load_task(str(policy_checkpoint))).__name__ == "SFTTask"
