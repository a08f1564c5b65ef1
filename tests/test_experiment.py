"""The experiment command: its graph, a tiny real run of every stage (1 seed), and the summary it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dress_lightning.cli import main
from dress_lightning.conversation import FORMAT_VERSION
from dress_lightning.evaluation.intervals import HEADLINE, prompt_tallies, ratio, read_tallies
from dress_lightning.experiment import ARMS, experiment_stages
from dress_lightning.stages import GROUNDING_WARMUP

ROOT = Path(__file__).resolve().parents[1]


def test_graph_runs_each_stage_after_its_inputs():
    stages = experiment_stages([0, 1], ["crl", "sft_control"], "val", Path("runs/x"))
    names = [s.name for s in stages]
    # One grounding warm-up, the main job's, shared by the seeds: every seed's SFT starts from it.
    assert names[0] == "warmup" and names.count("warmup") == 1
    assert stages[0].configs == GROUNDING_WARMUP.configs
    for seed in (0, 1):
        sft = stages[names.index(f"sft/seed{seed}")].overrides
        assert sft[sft.index("--model.init_args.init_checkpoint") + 1] == "runs/x/warmup/checkpoints/last.ckpt"
        order = [f"sft/seed{seed}", f"rollout/seed{seed}", f"crl/seed{seed}", f"eval_val_crl/seed{seed}"]
        assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
        crl = stages[names.index(f"crl/seed{seed}")]
        # Each seed's CRL starts from that seed's SFT and trains on that seed's rollout, under that seed.
        assert f"runs/x/seed{seed}/sft/checkpoints/last.ckpt" in crl.overrides
        assert f"runs/x/seed{seed}/nlf" in crl.overrides
        assert crl.overrides[crl.overrides.index("--seed_everything") + 1] == str(seed)
    assert "crl_score_only/seed0" not in names
    # A combined arm stacks its levers' configs over CRL's, in order.
    combined = {s.name: s for s in experiment_stages([0], ["crl_judge_target_reference"], "val", Path("runs/x"))}
    assert combined["crl_judge_target_reference/seed0"].configs == (
        "configs/crl.yaml", "configs/reproduce/crl.yaml", "configs/reproduce/crl_judge_target.yaml",
        "configs/reproduce/crl_reference.yaml")

    # A second round: the round-1 model's own answers, judged, train it again (each round's data kept apart).
    rounds = {s.name: s for s in experiment_stages([0], ["crl_round2"], "val", Path("runs/x"))}
    assert "crl/seed0" in rounds  # the round it continues is built first
    assert "runs/x/seed0/crl/checkpoints/last.ckpt" in rounds["rollout_crl_round2/seed0"].overrides
    second = rounds["crl_round2/seed0"].overrides
    assert second[second.index("--model.init_args.init_checkpoint") + 1] == "runs/x/seed0/crl/checkpoints/last.ckpt"
    assert second[second.index("--data.init_args.nlf_shards") + 1] == "runs/x/seed0/crl_round2_nlf"
    with pytest.raises(ValueError, match="unknown arm"):
        experiment_stages([0], ["dpo_typo"], "val", Path("runs/x"))


def test_a_rollout_lever_trains_on_its_own_rollout_and_a_decoding_row_trains_nothing():
    stages = {s.name: s for s in experiment_stages(
        [0], ["crl", "crl_samples4", "crl_dropout_guided_low"], "val", Path("runs/x"))}
    # The broader rollout: the seed's SFT model, the lever's config over the shared rollout's, its own output.
    broad = stages["rollout_crl_samples4/seed0"]
    assert broad.configs[-1] == "configs/reproduce/rollout_samples4.yaml"
    assert broad.configs[:-1] == stages["rollout/seed0"].configs
    assert "runs/x/seed0/sft/checkpoints/last.ckpt" in broad.overrides
    assert broad.output == "runs/x/seed0/crl_samples4_nlf"
    lever = stages["crl_samples4/seed0"]
    assert lever.configs == stages["crl/seed0"].configs  # plain CRL: only its data differ
    assert lever.overrides[lever.overrides.index("--data.init_args.nlf_shards") + 1] == "runs/x/seed0/crl_samples4_nlf"
    # Guidance: crl_dropout is trained (a prerequisite), the decoding row only evaluated, on crl_dropout's model.
    assert "crl_dropout/seed0" in stages and "crl_dropout_guided_low/seed0" not in stages
    guided = stages["eval_val_crl_dropout_guided_low/seed0"].overrides
    assert guided[guided.index("--checkpoint") + 1] == "runs/x/seed0/crl_dropout/checkpoints/last.ckpt"
    assert guided[guided.index("--generation.guidance_scale") + 1] == "1.5"
    assert guided[guided.index("--generation.negative_condition") + 1] == "low"
    assert "eval_val_crl_dropout_guided_low@low/seed0" not in stages  # no steering rows under guidance


def test_each_rollout_lever_changes_its_one_setting(monkeypatch):
    from dress_lightning.commands.rollout import load_rollout_config

    monkeypatch.chdir(ROOT)
    stages = {s.name: s for s in experiment_stages(
        [0], ["crl_samples4", "crl_temperature07", "crl_prompts600"], "val", Path("runs/x"))}
    shared = load_rollout_config(stages["rollout/seed0"].configs)
    assert (shared.generation.num_samples, shared.generation.temperature, shared.prompts_shapeworld.samples) == (2, 1.0, 300)
    changed = {arm: load_rollout_config(stages[f"rollout_{arm}/seed0"].configs)
               for arm in ("crl_samples4", "crl_temperature07", "crl_prompts600")}
    assert (changed["crl_samples4"].generation.num_samples, changed["crl_samples4"].generation.temperature) == (4, 1.0)
    assert (changed["crl_temperature07"].generation.num_samples, changed["crl_temperature07"].generation.temperature) == (2, 0.7)
    more = changed["crl_prompts600"]
    assert (more.generation.num_samples, more.prompts_shapeworld.samples) == (2, 600)
    assert more.prompts != shared.prompts  # its own prompt shards, not the 300 of the shared rollout
    assert more.prompts_shapeworld.seed == shared.prompts_shapeworld.seed  # the same first 300 prompts


def _tiny_overlays(root: Path) -> list[str]:
    fit = yaml.safe_load((ROOT / "configs/overlays/ci_tiny.yaml").read_text())
    fit["trainer"]["max_steps"] = 2
    fit["data"]["init_args"]["epoch_length"] = 32
    rollout = {"batch_size": 2, "num_workers": 0, "samples": 4, "generation": {"max_new_tokens": 12},
               "prompts_shapeworld": {"split": "train", "samples": 4, "seed": 1, "shard_size": 2}}
    sets = yaml.safe_load((ROOT / "configs/reproduce/eval_val.yaml").read_text())["sets"]
    for s in sets:
        s["shapeworld"].update(samples=6, shard_size=3)
    evaluate = {"sets": sets, "batch_size": 3, "num_workers": 0, "generation": {"max_new_tokens": 12}}
    paths = []
    for command, overlay in (("fit", fit), ("rollout", rollout), ("evaluate", evaluate)):
        path = root / f"tiny_{command}.yaml"
        path.write_text(yaml.safe_dump(overlay))
        paths += ["--overlay", f"{command}={path}"]
    return paths


@pytest.mark.slow
def test_a_tiny_experiment_runs_resumes_and_summarizes(tmp_path, monkeypatch, capsys):
    from dress_lightning.inference import load_task

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    args = ["experiment", "--seeds", "3", "--arms", "crl", "sft_control", "crl_round2", "crl_samples4",
            "crl_judge_target_reference_guided_low", "--split", "val",
            "--json", str(out),
            *_tiny_overlays(tmp_path)]
    assert main(args) == 0
    report = capsys.readouterr().out  # the markdown report: results, then the diagnostics beside them
    for section in ("| crl | 1 |", "| crl_round2_vs_crl |", "Each seed on its own", "| crl @ low |",
                    "best-of-n", "| sft: questions, blank image |", "Distinct descriptions"):
        assert section in report, section
    summary = json.loads(out.read_text())
    assert [key for key in summary if key in ARMS] == ["sft", "sft_control", "crl", "crl_judge_target_reference",
                                                        "crl_round2", "crl_samples4",
                                                        "crl_judge_target_reference_guided_low"]
    crl = summary["crl"]
    assert crl["seeds"] == [3] and crl["prompts"] == 18  # 3 sets x 6 prompts
    steer = summary["diagnostics"]["steerability"]["crl"]
    assert set(steer) == {"low", "none"} and set(steer["low"]) == set(HEADLINE)
    assert summary["diagnostics"]["feedback_data"]["seed3"]["trajectories"] > 0
    assert "image" in summary["diagnostics"]["grounding"]["sft"][0]["questions"]
    # The headline numbers are the pooled per-prompt tallies of the evaluation's responses.
    tallies = read_tallies(Path("runs/repro/seed3/eval/val/crl"))
    for key in HEADLINE:
        assert crl[key] == ratio(list(tallies.values()), key)
        assert crl["per_seed"][0][key] == crl[key]
    # Per set, the tallies reproduce the report's TorchMetrics values exactly.
    report = json.loads(Path("runs/repro/seed3/eval/val/crl/report.json").read_text())
    where = {"helpfulness": ("helpfulness", "overall"), "honesty": ("honesty_score", "overall"), "chair_i": ("chair", "chair_i"),
             "chair_s": ("chair", "chair_s"), "safety": ("safety", "safety"),
             "improved_after_refinement": ("interaction", "improved_after_refinement"),
             "pope_accuracy": ("pope", "accuracy"), "pope_f1": ("pope", "f1"), "pope_yes_ratio": ("pope", "yes_ratio")}
    for name, results in report["sets"].items():
        entries = Path(f"runs/repro/seed3/eval/val/crl/{name}/responses.jsonl").read_text().splitlines()
        per_prompt = [prompt_tallies(json.loads(line)) for line in entries]
        for key, (group, metric) in where.items():
            expected = results["metrics"][group][metric]
            got = ratio(per_prompt, key)
            if key == "pope_f1" and expected is None and got == 0:
                continue  # no true positive: F1 = 2TP / (2TP + FP + FN) is 0 where POPE's 2PR / (P + R) is undefined
            assert (got is None and expected is None) or got == pytest.approx(expected), (name, key)
    assert set(summary["comparisons"]) == {f"{arm}_vs_{baseline}" for arm in (
        "crl_judge_target_reference", "crl_round2", "crl_samples4", "crl_judge_target_reference_guided_low")
        for baseline in ("sft_control", "crl")} | {"crl_vs_sft_control",
                                                    # guidance against the same model decoded without it
                                                    "crl_judge_target_reference_guided_low_vs_crl_judge_target_reference"}
    # The rollout lever's own rollout samples 4 answers per prompt where the shared one samples 2.
    feedback = summary["diagnostics"]["feedback_data"]
    assert feedback["seed3/crl_samples4"]["trajectories"] == 2 * feedback["seed3"]["trajectories"]
    # The decoding row evaluates the combination's model with guidance away from the low condition.
    guided = json.loads(Path("runs/repro/seed3/eval/val/crl_judge_target_reference_guided_low/report.json").read_text())
    assert guided["provenance"]["checkpoint"] == "runs/repro/seed3/crl_judge_target_reference/checkpoints/last.ckpt"
    assert all((s["generation"]["guidance_scale"], s["generation"]["negative_condition"]) == (1.5, "low")
               for s in guided["sets"].values())
    assert "crl_judge_target_reference_guided_low" not in summary["diagnostics"]["steerability"]
    assert set(summary["stage_seconds"]) >= {"warmup", "sft/seed3", "rollout/seed3", "crl/seed3"}
    for run in ("warmup", "seed3/sft", "seed3/crl"):  # the warm-up's image position embedding, carried through
        assert load_task(f"runs/repro/{run}/checkpoints/last.ckpt").model_config.image_position_embedding, run
    made_with = summary["provenance"]["evaluations"]["crl"][0]
    assert made_with["conversation_format"] == FORMAT_VERSION and made_with["seed"] == 3
    assert made_with["checkpoint"] == "runs/repro/seed3/crl/checkpoints/last.ckpt"

    # Run again: every stage is skipped (nothing retrained), the summary is rewritten.
    checkpoint = Path("runs/repro/seed3/crl/checkpoints/last.ckpt")
    before = checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert checkpoint.stat().st_mtime_ns == before


def test_processes_sharing_a_run_directory_keep_each_others_stage_times(tmp_path, monkeypatch):
    """One process per seed may share the run directory: a stage time recorded meanwhile is not overwritten."""
    from dress_lightning import experiment
    from dress_lightning.stages import Stage

    timings = tmp_path / "timings.json"

    def run_stage(stage):
        Path(stage.output).write_text("done")
        # Meanwhile another process (seed 1) records its own stage in the same file.
        recorded = json.loads(timings.read_text()) if timings.is_file() else {}
        timings.write_text(json.dumps({**recorded, f"other/{stage.name}": 1.0}))
        return 2.0

    monkeypatch.setattr(experiment, "run_stage", run_stage)
    stages = [Stage(name, "fit", (), str(tmp_path / name)) for name in ("sft", "crl")]
    experiment.run_experiment(stages, timings)
    assert json.loads(timings.read_text()) == {"other/sft": 1.0, "sft": 2.0, "other/crl": 1.0, "crl": 2.0}


def test_a_process_runs_what_another_does_not_hold_and_waits_only_for_what_it_needs(tmp_path, monkeypatch):
    """Two processes on one seed split its arms: while another process trains an arm, this one trains the next
    arm instead of waiting, and evaluates the other's arm only once its checkpoint is written."""
    import subprocess
    import sys
    import time

    from dress_lightning import experiment
    from dress_lightning.stages import Stage

    crl = Stage("crl/seed0", "fit", (), str(tmp_path / "crl.ckpt"))
    eval_crl = Stage("eval_val_crl/seed0", "evaluate", (), str(tmp_path / "eval_crl.json"),
                     ("--checkpoint", crl.output))
    rft = Stage("rft/seed0", "fit", (), str(tmp_path / "rft.ckpt"))
    # A rollout names its own output (--out): that is no input to wait for.
    rollout = Stage("rollout_crl/seed0", "rollout", (), str(tmp_path / "nlf"), ("--out", str(tmp_path / "nlf")))
    ran = []

    def run_stage(stage):
        ran.append((stage.name, Path(crl.output).exists()))
        Path(stage.output).write_text("done")
        return 1.0

    monkeypatch.setattr(experiment, "run_stage", run_stage)
    polls, real_sleep = [], time.sleep

    def sleep(seconds):  # a run that waits for good fails here instead of hanging the suite
        polls.append(seconds)
        assert len(polls) < 100, "run_experiment waits for a stage nobody runs"
        real_sleep(seconds)

    monkeypatch.setattr(experiment.time, "sleep", sleep)
    other = subprocess.Popen([sys.executable, "-c", f"import time, pathlib; time.sleep(1.5); "
                              f"pathlib.Path({crl.output!r}).write_text('done by the other process'); "
                              f"pathlib.Path({crl.output + '.running'!r}).unlink()"])
    Path(f"{crl.output}.running").write_text(str(other.pid))

    experiment.run_experiment([crl, eval_crl, rft, rollout], tmp_path / "timings.json", poll_seconds=0.2)
    other.wait()
    # rft and the rollout ran while crl was still being trained elsewhere; the evaluation waited for crl's checkpoint.
    assert ran == [("rft/seed0", False), ("rollout_crl/seed0", False), ("eval_val_crl/seed0", True)]
    assert Path(crl.output).read_text() == "done by the other process"
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"rft/seed0", "rollout_crl/seed0",
                                                                         "eval_val_crl/seed0"}


def test_a_stage_another_process_runs_is_waited_for_and_a_dead_claim_taken_over(tmp_path, monkeypatch):
    """Processes sharing a run directory never run a stage twice, and a claim left by a killed one does not block."""
    import subprocess
    import sys

    from dress_lightning import experiment
    from dress_lightning.stages import Stage

    ran = []

    def run_stage(stage):
        ran.append(stage.name)
        Path(stage.output).write_text("done")
        return 1.0

    monkeypatch.setattr(experiment, "run_stage", run_stage)
    busy, orphaned = (Stage(name, "fit", (), str(tmp_path / name)) for name in ("busy", "orphaned"))
    # "busy" is being run by another live process, which writes its output in a moment and releases its claim.
    other = subprocess.Popen([sys.executable, "-c", f"import time, pathlib; time.sleep(1.0); "
                              f"pathlib.Path({busy.output!r}).write_text('done by the other process'); "
                              f"pathlib.Path({busy.output + '.running'!r}).unlink()"])
    Path(f"{busy.output}.running").write_text(str(other.pid))
    # "orphaned" was claimed by a process that is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(f"{orphaned.output}.running").write_text(str(dead.pid))

    experiment.run_experiment([busy, orphaned], tmp_path / "timings.json", poll_seconds=0.2)
    other.wait()
    assert ran == ["orphaned"]
    assert Path(busy.output).read_text() == "done by the other process"
    assert not list(tmp_path.glob("*.running"))
