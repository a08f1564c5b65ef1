"""The ``data`` commands through ``dress_lightning.cli.main``, plus one real ``python -m`` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from dress_lightning.cli import main
from dress_lightning.data.schema import Sample, alternating_turns, build_record, encode_sample
from dress_lightning.data.shapeworld import generate_sample
from dress_lightning.data.shards import write_samples
from dress_lightning.special_tokens import IMAGE_TOKEN


def _shapeworld(out: Path, *extra: str, split: str = "train", samples: int = 25) -> int:
    return main(
        ["data", "shapeworld", "--out", str(out), "--split", split, "--samples", str(samples), "--seed", "3", *extra]
    )


def test_shapeworld_writes_reproducible_shards_and_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    assert _shapeworld(out, "--shard-size", "10") == 0
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == [f"shapeworld-train-00000{i}.tar" for i in range(3)]
    assert "wrote 25 samples in 3 shard(s)" in capsys.readouterr().out

    manifest = json.loads((out / "shapeworld-train-manifest.json").read_text())
    assert manifest["written"] == 25 and manifest["skipped"] == {}
    assert manifest["args"]["seed"] == 3 and manifest["shards"] == [p.name for p in shards]
    assert manifest["dress_lightning_version"] and manifest["created"]

    # The shards hold exactly what the generator makes, in order.
    raw = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    expected = [encode_sample(generate_sample("train", 3, i)) for i in range(25)]
    assert [(r["__key__"], r["png"], r["json"]) for r in raw] == [(e["__key__"], e["png"], e["json"]) for e in expected]

    first_bytes = [p.read_bytes() for p in shards]
    assert _shapeworld(out, "--shard-size", "10") == 2  # refuses to mix with a previous run
    assert "pass --overwrite" in capsys.readouterr().err
    assert _shapeworld(out, "--shard-size", "10", "--overwrite") == 0
    assert [p.read_bytes() for p in sorted(out.glob("*.tar"))] == first_bytes  # byte-identical rerun

    assert _shapeworld(out, split="val") == 0
    val = list(wds.WebDataset(str(out / "shapeworld-val-000000.tar"), shardshuffle=False))
    assert len(val) == 25 and not {r["png"] for r in val} & {r["png"] for r in raw}


def test_overwrite_removes_stale_shards(tmp_path: Path) -> None:
    assert _shapeworld(tmp_path, "--shard-size", "5") == 0
    assert len(list(tmp_path.glob("*.tar"))) == 5
    assert _shapeworld(tmp_path, "--overwrite", samples=4) == 0
    assert [p.name for p in tmp_path.glob("*.tar")] == ["shapeworld-train-000000.tar"]


def _nlf_sample(index: int, scores: list[float]) -> Sample:
    judge = {"name": "test-judge", "version": "1"}
    contents = [f"{IMAGE_TOKEN}\nQ{index}?"]
    for i, _ in enumerate(scores):
        contents += [f"answer {i}", f"refine {i}"]
    contents = contents[:-1]  # ends with the last answer
    feedback = [
        {"scores": {"honesty": s}, "score_max": 10.0, "critique": "c", "refinement": None, "judge": judge}
        for s in scores
    ]
    record = build_record(
        sample_id=f"nlf-{index}",
        source="dress_nlf",
        image_id="1",
        conversation=alternating_turns(contents),
        feedback=feedback,
    )
    return Sample(record=record, image=generate_sample("train", 0, 0).image, image_ext="png")


@pytest.fixture
def mixed_shards(tmp_path: Path) -> Path:
    """ShapeWorld and NLF shards, one shard holding an invalid sample, one truncated copy of a shard."""
    out = tmp_path / "mixed"
    assert _shapeworld(out, samples=6) == 0
    nlf = [_nlf_sample(0, [2.0, 8.0]), _nlf_sample(1, [5.0])]
    write_samples(((s.record["id"], s) for s in nlf), lambda s: s, out, "nlf", shard_size=10, tool="test")
    broken = _nlf_sample(2, [1.0])
    broken.record["conversation"][1]["role"] = "gpt"
    with wds.TarWriter(str(out / "handmade-000000.tar"), encoder=False) as writer:
        writer.write(encode_sample(broken))
    whole = (out / "shapeworld-train-000000.tar").read_bytes()
    (out / "truncated-000000.tar").write_bytes(whole[: len(whole) // 2 + 100])  # not block-aligned: mid-member
    return out


def test_inspect_json_counts_sources_feedback_and_skips(mixed_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(mixed_shards), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert stats["shards"] == 4
    # The truncated copy of the ShapeWorld shard still yields the samples before the damage.
    assert 6 + 2 <= stats["by_source"]["shapeworld"] < 6 + 6 and stats["by_source"]["dress_nlf"] == 2
    assert stats["samples"] == stats["by_source"]["shapeworld"] + 2
    assert stats["feedback_turns"] == 3
    assert stats["mean_score"] == {"honesty": pytest.approx((0.2 + 0.8 + 0.5) / 3)}
    assert stats["conversation_turns"]["4"] == 1
    assert set(stats["skipped"]) == {"invalid sample", "unreadable shard"} and stats["skipped"]["unreadable shard"] == 1
    # The handmade bad sample, plus the cut-off sample if the cut left its json without its image.
    assert stats["skipped"]["invalid sample"] in (1, 2)


def test_inspect_tables_and_brace_patterns(mixed_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", f"{mixed_shards}/{{nlf,handmade}}-000000.tar"]) == 0
    out = capsys.readouterr().out
    assert "2 samples in 2 shard(s)" in out
    assert "by_source: dress_nlf" in out and "skipped: invalid sample" in out
    assert "conversation[1].role" in out  # the first skipped example names the bad field


def test_inspect_entry_point_in_a_subprocess(tmp_path: Path) -> None:
    assert _shapeworld(tmp_path, samples=5) == 0
    result = subprocess.run(
        [sys.executable, "-m", "dress_lightning", "data", "inspect", str(tmp_path), "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    stats = json.loads(result.stdout)
    assert stats["samples"] == 5 and stats["skipped"] == {} and stats["feedback_turns"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["convert-llava", "--json", "{tmp}/missing.json", "--images", "{tmp}", "--out", "{tmp}/o"],
            "input file not found",
        ),
        (
            ["convert-nlf", "--jsonl", "{tmp}/helpfulness_nlf.jsonl", "--images", "{tmp}/nope", "--out", "{tmp}/o"],
            "image directory not found",
        ),
        (
            ["convert-coco", "--annotations", "{tmp}/bad.json", "--images", "{tmp}", "--out", "{tmp}/o"],
            "is not valid JSON",
        ),
        (
            ["convert-llava", "--json", "{tmp}/helpfulness_nlf.jsonl", "--images", "{tmp}", "--out", "{tmp}/o"],
            "is not valid JSON",
        ),
        (["inspect", "{tmp}/empty"], "no .tar shards found"),
        (["inspect", "{tmp}/gone-000000.tar"], "shard not found"),
        (["shapeworld", "--out", "{tmp}/o", "--split", "train", "--samples", "2", "--image-size", "20"], "at least 48"),
    ],
)
def test_unusable_inputs_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "helpfulness_nlf.jsonl").write_text("{}\n{}\n")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "empty").mkdir()
    assert main(["data", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nothing_written_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "helpfulness_nlf.jsonl"
    jsonl.write_text('{"image_id": "1"}\nnot json\n')
    out = tmp_path / "out"
    assert main(["data", "convert-nlf", "--jsonl", str(jsonl), "--images", str(tmp_path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "nothing was written" in captured.err
    assert "skipped: malformed json" in captured.out and "skipped: invalid record" in captured.out
    assert list(out.glob("*.tar")) == []  # no empty shard left behind
    assert json.loads((out / "dress_nlf-manifest.json").read_text())["skipped"] == {
        "invalid record": 1,
        "malformed json": 1,
    }


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--help"]) == 0
    assert "convert-nlf" in capsys.readouterr().out
    assert main(["data", "shapeworld", "--help"]) == 0
    assert "--image-size" in capsys.readouterr().out
    assert main(["data", "frobnicate"]) == 2
    assert main(["data", "shapeworld", "--out", "x", "--split", "dev", "--samples", "1"]) == 2
    assert "invalid choice: 'dev'" in capsys.readouterr().err
