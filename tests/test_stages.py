"""The stage graph: a command builds its missing inputs with the stages that write them, and nothing else."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from dress_lightning.cli import main
from dress_lightning.data.shapeworld import generate_sample
from dress_lightning.data.schema import encode_sample
from dress_lightning.stages import DEFAULT_STAGES, GROUNDING_WARMUP, Stage, build_missing_inputs, exists, producer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/overlays/ci_tiny.yaml")


def _composed(*args: str) -> str:
    """The merged config of ``fit`` args, as one YAML file's text (``--print_config``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return out.getvalue()


def _write_tiny_default_configs(root: Path) -> None:
    """configs/{clip,sft,rollout,crl}.yaml and the warm-up's overlay under ``root``: the shipped ones, tiny, with
    the shipped paths."""
    configs = root / "configs"
    (configs / "overlays").mkdir(parents=True)
    tower = ["--model.init_args.model.vision_pretrained", "runs/clip/tower.safetensors"]
    shipped = yaml.safe_load(Path(TINY).read_text())
    del shipped["model"]["init_args"]["init_checkpoint"]  # not an option of the clip stage's task
    clip_tiny = root / "clip_tiny.yaml"
    clip_tiny.write_text(yaml.safe_dump(shipped))
    (configs / "clip.yaml").write_text(_composed("-c", str(ROOT / "configs/clip.yaml"), "-c", str(clip_tiny)))
    (configs / "sft.yaml").write_text(_composed(
        "-c", str(ROOT / "configs/sft.yaml"), "-c", TINY, *tower, "--trainer.max_steps", "2",
        "--model.init_args.init_checkpoint", GROUNDING_WARMUP.output))
    warmup = yaml.safe_load((ROOT / "configs/overlays/grounding_warmup.yaml").read_text())
    warmup["data"]["init_args"].update(batch_size=4, train_shapeworld={
        **warmup["data"]["init_args"]["train_shapeworld"], "samples": 16, "shard_size": 8})
    (configs / "overlays" / "grounding_warmup.yaml").write_text(yaml.safe_dump(warmup))
    crl = _composed("-c", str(ROOT / "configs/crl.yaml"), "-c", TINY, *tower, "--data.init_args.epoch_length", "32")
    (configs / "crl.yaml").write_text(crl)
    rollout = yaml.safe_load((ROOT / "configs/rollout.yaml").read_text())
    rollout.update(batch_size=2, num_workers=0, prompts_shapeworld={"split": "train", "samples": 4, "seed": 1,
                                                                    "shard_size": 2})
    rollout["generation"]["max_new_tokens"] = 12
    (configs / "rollout.yaml").write_text(yaml.safe_dump(rollout))


@pytest.mark.slow
def test_main_job_builds_the_whole_graph_once(tmp_path, monkeypatch):
    """fit -c configs/crl.yaml on a fresh tree: clip -> grounding warm-up -> sft -> rollout run first, each once,
    then CRL."""
    _write_tiny_default_configs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", "configs/crl.yaml"]) == 0
    for stage in ("clip", "grounding_warmup", "sft", "rollout"):
        assert exists(next(s.output for s in DEFAULT_STAGES if s.name == stage)), stage
    assert Path("runs/crl/checkpoints/last.ckpt").is_file()
    assert Path("runs/clip/tower.json").is_file()  # provenance of the exported tower

    # A second run builds nothing again: every prerequisite's output is left as it was.
    before = {s.name: Path(s.output).stat().st_mtime_ns for s in DEFAULT_STAGES if s.name != "pretrain"}
    assert main(["fit", "-c", "configs/crl.yaml", "--trainer.max_steps", "1",
                 "--trainer.callbacks.init_args.dirpath", "runs/crl2/checkpoints"]) == 0
    assert before == {s.name: Path(s.output).stat().st_mtime_ns for s in DEFAULT_STAGES if s.name != "pretrain"}


def test_a_missing_input_no_stage_writes_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*typo.ckpt.*does not exist.*no stage"):
        build_missing_inputs({"checkpoint": str(tmp_path / "runs/sft/checkpoints/typo.ckpt")})


def test_existing_inputs_tags_and_urls_run_nothing(tmp_path):
    never = Stage("never", "fit", ("configs/missing.yaml",), str(tmp_path / "out.ckpt"))
    (tmp_path / "here.ckpt").write_bytes(b"x")
    ran = build_missing_inputs(
        {"a": str(tmp_path / "here.ckpt"), "b": "openai", "c": "pipe:cat x.tar", "d": "s/{000..009}.tar", "e": None},
        stages=[never],
    )
    assert ran == []


def test_an_empty_or_damaged_shard_is_not_data(tmp_path):
    shards = tmp_path / "nlf"
    shards.mkdir()
    (shards / "rollout-000000.tar").write_bytes(b"")
    (shards / "rollout-000001.tar").write_bytes(b"not a tar")
    assert not exists(shards)
    with wds.TarWriter(str(shards / "rollout-000002.tar"), encoder=False) as writer:
        writer.write(encode_sample(generate_sample("train", 0, 0)))
    assert exists(shards)


def test_the_default_graph_names_who_writes_what():
    assert producer("runs/sft/checkpoints/last.ckpt").name == "sft"
    assert producer("./runs/clip/tower.safetensors").name == "clip"
    assert producer("data/shards/nlf/shapeworld").name == "rollout"
    assert producer("runs/elsewhere/last.ckpt") is None


def test_every_design_reference_names_a_section_of_docs_design_md():
    """Docstrings cite docs/design.md s.N; each N is a section there."""
    import re

    root = Path(__file__).resolve().parents[1]
    sections = set(re.findall(r"^## (\d+)\. ", (root / "docs/design.md").read_text(), re.M))
    cited = {
        (path.name, number)
        for path in (root / "src").rglob("*.py")
        for number in re.findall(r"design\.md`*\s+s\.(\d+)", path.read_text())
    }
    assert cited, "no docstring cites docs/design.md"
    assert {number for _, number in cited} <= sections, sorted(cited)
