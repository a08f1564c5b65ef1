"""The Lightning CLI end to end on the tiny preset: configs, fit, resume, checkpoints, distributed."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.experiment import ARMS, experiment_stages

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TRAINING_CONFIGS = [p for p in CONFIGS if p.parent.name == "configs" and "trainer:\n" in p.read_text()
                    and "model:\n" in p.read_text()]


def _fit_args(config: str, tmp_path: Path, *extra: str) -> list[str]:
    shards = tmp_path / "shards"
    return [
        "-c", str(ROOT / "configs" / config), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "run"), "--trainer.logger.name", "", "--trainer.logger.version", "0",
        "--data.init_args.train_shards", str(shards / "train"), "--data.init_args.val_shards", str(shards / "val"),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "run" / "checkpoints"),  # the YAML's ModelCheckpoint
        *extra,
    ]


def _subprocess(*args: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    result = subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _losses(metrics_csv: Path) -> dict[int, float]:
    with metrics_csv.open() as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: dress_lightning.tasks" in capsys.readouterr().out


@pytest.mark.parametrize("arm, critique, refinement_target, keep_refined", [
    ("crl", "TARGET_CRITIQUE", "own", "improved"),  # DRESS as published: the experiment's crl row
    ("crl_judge_target_reference", "PERFECT_SHAPEWORLD_CRITIQUE", "reference", "improved"),  # = configs/crl.yaml
    ("crl_judge_target_reference_all", "PERFECT_SHAPEWORLD_CRITIQUE", "reference", "all"),
    ("crl_judge_target_reference_more_sft", "PERFECT_SHAPEWORLD_CRITIQUE", "reference", "improved"),
])
def test_the_arms_target_and_refinement_settings_are_what_their_names_say(arm, critique, refinement_target, keep_refined):
    """YAML cannot import the constants: the judge's words for a perfect answer must not drift from its code,
    and a lever stacked on another must not reset its turn settings."""
    import yaml

    from dress_lightning import conditions

    stacks = {"main job": ("configs/crl.yaml",)} if arm == "crl_judge_target_reference" else {}
    stacks[arm] = next(s for s in experiment_stages([0], [arm], "val", Path("runs/x")) if s.name == f"{arm}/seed0").configs
    for stack in stacks.values():
        merged_critique, merged_target, merged_keep = None, None, None
        for path in stack:
            config = yaml.safe_load((ROOT / path).read_text()) or {}
            condition = config.get("model", {}).get("init_args", {}).get("condition", {})
            turns = config.get("data", {}).get("init_args", {}).get("turns", {})
            merged_critique = condition.get("target_critique", merged_critique)
            merged_target = turns.get("refinement_target", merged_target)
            merged_keep = turns.get("keep_refined", merged_keep)
        assert merged_critique == getattr(conditions, critique)
        assert merged_target == refinement_target
        assert merged_keep == keep_refined


def test_interpolations_follow_overrides_and_overlays(capsys):
    """${...} links resolve on the merged config: a new max_steps or lr reaches the scheduler."""
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/reproduce/sft.yaml"),
              "-c", str(ROOT / "configs/reproduce/sft_control.yaml"), "--trainer.max_steps", "7", "--print_config"])
    printed = capsys.readouterr().out
    assert "total_steps: 7\n" in printed and "max_lr: 0.0002\n" in printed  # sft_control.yaml's lr, not sft.yaml's


def test_rollout_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["feedback", "rollout", "-c", str(ROOT / "configs/rollout.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "refinement_turns: 2" in capsys.readouterr().out


EVAL_CONFIGS = [ROOT / "configs/eval.yaml", ROOT / "configs/eval_real.yaml", ROOT / "configs/eval_val.yaml"]
# One of each kind of stage of the experiment (the warm-up, every arm, the rollout, both evaluations), as it runs them.
EXPERIMENT_STAGES = {
    (stage.command, stage.configs): stage
    for split in ("val", "test")
    for stage in experiment_stages([0], list(ARMS), split, Path("runs/repro"))
}


def test_every_config_is_tested():
    overlays = [p for p in CONFIGS if p.parent.name == "overlays"]
    reproduction = {ROOT / config for _, configs in EXPERIMENT_STAGES for config in configs} - set(EVAL_CONFIGS)
    assert sorted(CONFIGS) == sorted(
        {*TRAINING_CONFIGS, ROOT / "configs/rollout.yaml", *overlays, *EVAL_CONFIGS, *reproduction}
    )


@pytest.mark.parametrize("stack", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_configs_parse(stack, capsys):
    configs = ["-c", str(EVAL_CONFIGS[0])] + (["-c", str(stack)] if stack != EVAL_CONFIGS[0] else [])
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *configs, "--print_config"])
    assert exit_info.value.code == 0
    assert "refinement_turns: 2" in capsys.readouterr().out


@pytest.mark.parametrize("stage", list(EXPERIMENT_STAGES.values()), ids=lambda stage: stage.name.split("/")[0])
def test_experiment_stages_compose(stage, capsys, monkeypatch):
    """Each stage's configs and overrides parse together and put its outputs in its run directory."""
    monkeypatch.chdir(ROOT)
    command = ["feedback", "rollout"] if stage.command == "rollout" else [stage.command]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *stage.arguments(), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert str(Path(stage.output).parent if stage.command != "fit" else Path(stage.output).parents[1]) in printed


@pytest.mark.parametrize("overlay", [p for p in CONFIGS if p.parent.name == "overlays"], ids=lambda p: p.name)
def test_every_overlay_composes_with_sft(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(overlay), "--print_config"])
    assert exit_info.value.code == 0


def test_console_script_prints_the_same_config(tmp_path):
    args = ["fit", "-c", str(ROOT / "configs/sft.yaml"), "--print_config"]
    script = Path(sys.executable).parent / "dress-lightning"
    via_script = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)
    via_module = subprocess.run([sys.executable, "-m", "dress_lightning", *args], capture_output=True, text=True,
                                timeout=120)
    assert via_script.returncode == via_module.returncode == 0
    assert via_script.stdout == via_module.stdout


def test_gpu_only_settings_fail_with_what_to_change(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the check only applies on CPU-only machines")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_fit_args("sft.yaml", tmp_path, "--trainer.precision", "16-mixed", "--trainer.strategy", "fsdp")])
    message = str(exit_info.value.code)
    assert "precision='16-mixed': use precision: bf16-mixed" in message
    assert "strategy='fsdp'" in message and "ModelParallelStrategy" in message


def test_fit_resumes_mid_epoch_on_the_same_trajectory(tmp_path):
    """Interrupt after step 3, resume from its checkpoint: steps 4-6 repeat the uninterrupted losses."""
    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.dirpath", str(tmp_path / "full" / "ckpt")]
    main(["fit", *_fit_args("sft.yaml", tmp_path / "full", *ckpt)])
    full = _losses(tmp_path / "full" / "run" / "version_0" / "metrics.csv")
    assert sorted(full) == list(range(6)), full  # CSVLogger counts steps from 0

    step3 = tmp_path / "full" / "ckpt" / "epoch=0-step=3.ckpt"
    state = torch.load(step3, weights_only=True)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir).mkdir()
    os.symlink(tmp_path / "full" / "shards", resumed_dir / "shards")  # same shards, no regeneration
    main(["fit", *_fit_args("sft.yaml", resumed_dir), "--ckpt_path", str(step3)])
    resumed = _losses(resumed_dir / "run" / "version_0" / "metrics.csv")

    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (step, resumed, full)
    # The checkpoint holds what trains: no frozen vision tower weights.
    assert not any(key.startswith("model.vision.") for key in state["state_dict"])
    assert any(key.startswith("model.projector.") for key in state["state_dict"])


def test_lora_sft_checkpoint_holds_only_adapters_and_projector(tmp_path):
    main(["fit", *_fit_args("sft.yaml", tmp_path, "--model.init_args.lora.r", "4", "--trainer.max_steps", "2",
                            "--trainer.val_check_interval", "2")])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    keys = torch.load(ckpt, weights_only=True)["state_dict"].keys()
    assert keys and all("lora_" in k or k.startswith("model.projector.") for k in keys), sorted(keys)[:5]
    assert any("lora_A" in k for k in keys)


def test_pretrain_trains_the_projector_only(tmp_path):
    main(["fit", *_fit_args("pretrain.yaml", tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    keys = torch.load(ckpt, weights_only=True)["state_dict"].keys()
    assert keys and all(k.startswith("model.projector.") for k in keys)


@pytest.mark.parametrize("overlay", ["ddp_cpu.yaml", "fsdp_cpu.yaml"])
def test_distributed_strategies_read_different_shards(tmp_path, overlay):
    args = _fit_args("sft.yaml", tmp_path, "-c", str(ROOT / "configs/overlays" / overlay),
                     "--trainer.callbacks+=record_batches.RecordBatchIds", "--trainer.max_steps", "3",
                     "--trainer.limit_val_batches", "0")
    _subprocess("fit", *args, tmp_path=tmp_path)
    per_rank = [json.loads((tmp_path / "run" / f"batches-rank{r}.json").read_text()) for r in range(2)]
    assert all(len(batches) == 3 for batches in per_rank)
    seen = [{i for batch in batches for i in batch} for batches in per_rank]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert (tmp_path / "run" / "version_0" / "metrics.csv").exists()


def test_grounding_warmup_trains_on_colour_and_shape_questions_and_hands_its_weights_to_sft(tmp_path):
    """The README's grounding recipe: the overlay's warm-up, then SFT from its checkpoint with the position embedding."""
    import yaml

    from dress_lightning.data.shards import expand_shard_urls, iter_samples
    from dress_lightning.data.skips import SkipLog
    from dress_lightning.inference import load_task
    from dress_lightning.tasks import SFTTask

    overlay = ROOT / "configs/overlays/grounding_warmup.yaml"
    spec = yaml.safe_load(overlay.read_text())["data"]["init_args"]["train_shapeworld"]
    tiny_spec = {**spec, "samples": 32, "shard_size": 8}  # the overlay's questions, a CI-sized set
    args = _fit_args("sft.yaml", tmp_path, "--data.init_args.train_shapeworld", json.dumps(tiny_spec),
                     "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")
    args[2:2] = ["-c", str(overlay)]  # right after sft.yaml: the test's paths and sizes still come after it
    main(["fit", *args])
    warmup = tmp_path / "run" / "checkpoints" / "last.ckpt"
    samples = list(iter_samples(expand_shard_urls([str(tmp_path / "shards" / "train")]), SkipLog()))
    assert len(samples) == 32
    assert {s.record["annotations"]["queries"][0]["type"] for s in samples} == {"color", "shape"}

    trained = torch.load(warmup, weights_only=True)["state_dict"]
    config = load_task(str(warmup)).model_config
    assert config.image_position_embedding
    sft, fresh = SFTTask(model=config, init_checkpoint=str(warmup)), SFTTask(model=config)
    sft.configure_model()
    fresh.configure_model()
    assert not torch.allclose(fresh.state_dict()["model.projector.0.weight"], trained["model.projector.0.weight"])
    torch.testing.assert_close(sft.state_dict()["model.projector.0.weight"], trained["model.projector.0.weight"])
    torch.testing.assert_close(sft.state_dict()["model.language_model.model.norm.weight"],
                               trained["model.language_model.model.norm.weight"])


def test_load_task_rebuilds_the_trained_model(tmp_path):
    from dress_lightning.inference import load_task
    from dress_lightning.tasks import SFTTask

    main(["fit", *_fit_args("sft.yaml", tmp_path, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2")])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    trained = torch.load(ckpt, weights_only=True)["state_dict"]

    task = load_task(str(ckpt))
    assert type(task) is SFTTask and not task.training
    weights = task.state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(weights[name], tensor)
    # Frozen weights come back from the config, identical to a fresh build of it.
    fresh = SFTTask(model=task.model_config)
    fresh.configure_model()
    torch.testing.assert_close(weights["model.vision.visual.conv1.weight"],
                               fresh.state_dict()["model.vision.visual.conv1.weight"])


def test_progress_bar_can_be_turned_off(tmp_path):
    main(["fit", *_fit_args("sft.yaml", tmp_path, "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1",
                            "--trainer.limit_val_batches", "0")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_null_on_the_command_line_means_none(tmp_path):
    """jsonargparse reads a dotted ``null`` inside init_args as the string "None"; the config reads it as None."""
    main(["fit", *_fit_args("sft.yaml", tmp_path, "--model.init_args.model.vision_pretrained", "null",
                            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
