"""``kill -9`` of a real ``fit`` mid-epoch (conditional RL, 2 loader workers), then a resume from its last checkpoint.

The resumed run must retrace the uninterrupted run: same losses from the checkpoint's step on,
which needs the checkpoint whole, the mixed resampled stream replayed at the same position in
every worker, and the optimizer and scheduler state restored.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dress_lightning.atomic import CRASH_AT_ENV
from dress_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
CHECKPOINT_EVERY = 2
KILL_AFTER_STEP = 3  # the 3rd batch: its step is done, the step-2 checkpoint is the last on disk


@pytest.fixture(scope="module")
def nlf_shards(policy_checkpoint, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nlf")
    assert main(["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--checkpoint",
                 str(policy_checkpoint), "--prompts", str(tmp / "prompts"),
                 "--prompts_shapeworld.samples", "8", "--prompts_shapeworld.shard_size", "2", "--out",
                 str(tmp / "nlf"), "--batch_size", "4", "--num_workers", "0", "--shard_size", "4",
                 "--generation.max_new_tokens", "12", "--refinement_turns", "1"]) == 0
    return tmp / "nlf"


def _fit(run: Path, policy_checkpoint: Path, nlf: Path, *extra: str, crash_at: str | None = None):
    sft_shards = policy_checkpoint.parent.parent / "train"
    args = ["fit", "-c", str(ROOT / "configs/crl.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
            "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0", "--trainer.val_check_interval",
            "null", "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
            "--trainer.logger.init_args.version", "0", "--trainer.callbacks.init_args.dirpath", str(run / "ck"),
            "--trainer.callbacks.init_args.every_n_train_steps", str(CHECKPOINT_EVERY),
            "--model.init_args.init_checkpoint", str(policy_checkpoint),
            "--data.init_args.nlf_shards", str(nlf),
            "--data.init_args.train_shards", str(sft_shards), "--data.init_args.val_shards", "null",
            "--data.init_args.train_shapeworld", "null", "--data.init_args.val_shapeworld", "null",
            "--data.init_args.num_workers", "2", "--data.init_args.epoch_length", "4096", *extra]
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT_ENV}
    if crash_at:
        env[CRASH_AT_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                          timeout=600, cwd=run, env=env)


def _losses(run: Path) -> dict[int, float]:
    with (run / "version_0" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_fit_killed_mid_epoch_resumes_on_the_same_loss_trajectory(policy_checkpoint, nlf_shards, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    result = _fit(full, policy_checkpoint, nlf_shards)
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = _losses(full)
    assert sorted(uninterrupted) == list(range(STEPS))  # CSVLogger counts steps from 0

    result = _fit(killed, policy_checkpoint, nlf_shards, crash_at=f"fit.train_batch_end@{KILL_AFTER_STEP}")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = killed / "ck" / "last.ckpt"
    result = _fit(killed, policy_checkpoint, nlf_shards, "--ckpt_path", str(last),
                  "--trainer.logger.init_args.version", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    with (killed / "version_1" / "metrics.csv").open() as f:
        resumed = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    checkpoint_step = (KILL_AFTER_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert sorted(resumed) == list(range(checkpoint_step, STEPS))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), (step, resumed, uninterrupted)
