"""The baselines to conditional RL through the real CLI: rft.yaml and dpo.yaml train on NLF shards, and the
checkpoint loads for evaluation like every other task's."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from dress_lightning.cli import main
from dress_lightning.experiment import experiment_stages
from dress_lightning.inference import load_task
from dress_lightning.tasks import DPOTask, RFTTask

ROOT = Path(__file__).resolve().parents[2]

# Per config: the task, what its fit logs, the derived-data directory it writes.
BASELINES = {
    "rft.yaml": (RFTTask, ["train/loss"], "rft_data"),
    "dpo.yaml": (DPOTask, ["train/loss", "train/reward_accuracy", "train/reward_margin", "train/rewards_chosen",
                           "train/rewards_rejected"], "dpo_pairs"),
}


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("config", list(BASELINES))
def test_baseline_trains_from_the_sft_model_and_its_checkpoint_evaluates(config, judged_nlf_shards,
                                                                         policy_checkpoint, tmp_path):
    task_class, logged, derived = BASELINES[config]
    run, shards = tmp_path / "run", policy_checkpoint.parent.parent
    assert main(["fit", "-c", str(ROOT / "configs" / config), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
                 "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                 "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
                 "--trainer.logger.init_args.version", "0", "--trainer.callbacks.init_args.dirpath", str(run / "ck"),
                 "--model.init_args.init_checkpoint", str(policy_checkpoint),
                 "--data.init_args.nlf_shards", str(judged_nlf_shards),
                 "--data.init_args.train_shards", str(shards / "train"), "--data.init_args.train_shapeworld", "null",
                 "--data.init_args.val_shards", str(shards / "val"), "--data.init_args.val_shapeworld", "null",
                 "--data.init_args.epoch_length", "64"]) == 0

    rows = _metrics(run)
    for name in logged:
        assert [r for r in rows if r.get(name)], f"{name} was not logged"
    assert [r for r in rows if r.get("val/loss")]  # validated on SFT data with the plain LM loss
    summary = json.loads((run / derived / "summary.json").read_text())
    assert summary["trajectories"] == 18 and summary["skipped"]["failed judgement"] == 3

    checkpoint = run / "ck" / "last.ckpt"
    keys = torch.load(checkpoint, weights_only=True)["state_dict"].keys()
    assert keys and not any(k.startswith(("model.vision.", "reference.")) for k in keys)
    task = load_task(str(checkpoint))
    assert type(task) is task_class and not task.training
    assert getattr(task, "reference", None) is None  # evaluation builds no DPO reference

    overlay = {"checkpoint": str(checkpoint), "out": str(tmp_path / "eval"), "batch_size": 4, "num_workers": 0,
               "generation": {"max_new_tokens": 8},
               "sets": [{"name": "shapeworld", "shards": str(tmp_path / "prompts"),
                         "shapeworld": {"split": "test", "samples": 4, "seed": 0, "shard_size": 4},
                         "categories": ["describe", "count", "color", "shape", "exists", "position", "conversation"],
                         "vocabulary": "shapeworld", "chair_categories": None, "refinement_turns": 0}]}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(overlay))
    assert main(["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["sets"]["shapeworld"]["prompts"] == 4


@pytest.mark.parametrize("arm", ["rft", "dpo"])
def test_experiment_arms_train_on_crls_nlf_from_its_sft_model_for_as_many_steps(arm):
    stages = {s.name: s for s in experiment_stages([0], ["crl", arm], "val", Path("runs/repro"))}
    crl, baseline = stages["crl/seed0"], stages[f"{arm}/seed0"]

    def option(stage, name):
        return stage.overrides[stage.overrides.index(name) + 1]

    for name in ("--model.init_args.init_checkpoint", "--data.init_args.nlf_shards", "--seed_everything"):
        assert option(baseline, name) == option(crl, name)
    steps = {name: yaml.safe_load((ROOT / "configs/reproduce" / f"{name}.yaml").read_text())["trainer"]["max_steps"]
             for name in ("crl", arm)}
    assert steps[arm] == steps["crl"]
