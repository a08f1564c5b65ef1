"""Converters on small inputs in every released variant, run through the CLI and read back from shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dress_lightning.cli import main
from dress_lightning.data.converters import NLF_JUDGE, ImageDir, normalize_image_id
from dress_lightning.data.schema import Sample
from dress_lightning.data.shards import expand_shard_urls, iter_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.special_tokens import IMAGE_TOKEN


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """COCO-named images: padded and unpadded names, JPEG and PNG, and a PNG behind a .jpg name."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 12), (200, 20, 20)).save(root / "000000151112.jpg", format="JPEG")
    Image.new("RGB", (16, 12), (20, 200, 20)).save(root / "000000000042.jpg", format="JPEG")
    Image.new("RGB", (16, 12), (20, 20, 200)).save(root / "7.png", format="PNG")
    Image.new("RGB", (16, 12), (90, 90, 90)).save(root / "000000000005.jpg", format="PNG")
    (root / "000000000006.jpg").write_bytes(b"not an image")
    return root


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _read(out: Path) -> dict[str, Sample]:
    skips = SkipLog()
    samples = {s.record["id"]: s for s in iter_samples(expand_shard_urls([str(out)]), skips)}
    assert skips.records == []
    return samples


def _manifest(out: Path, prefix: str) -> dict[str, Any]:
    return json.loads((out / f"{prefix}-manifest.json").read_text())


def test_image_dir_resolves_padded_and_unpadded_ids(images: Path) -> None:
    found = ImageDir(images)
    assert found.load("151112")[1] == "jpg"  # unpadded id, padded file
    assert found.load("000000000007")[1] == "png"  # padded id, unpadded file
    assert found.load("000000000005")[1] == "png"  # the format comes from the content, not the name
    assert found.load("coco/train2017/000000000042.jpg")[1] == "jpg"
    assert normalize_image_id(151112) == normalize_image_id("151112") == "000000151112"
    assert normalize_image_id("coco/train2017/000000000042.jpg") == "000000000042"


def _nlf_turn(user: str, model: str, rating: Any, critique: str, key: str) -> dict[str, Any]:
    return {"user": user, "model": model, "rating": rating, key: critique}


def test_convert_nlf_reads_every_variant_and_counts_broken_records(tmp_path: Path, images: Path) -> None:
    helpfulness = _write_jsonl(
        tmp_path / "helpfulness_nlf.jsonl",
        [
            {
                "image_id": "151112",
                "caption": "A red square.",
                "interaction": [
                    _nlf_turn("What is this?", "A blue circle.", "4", "Wrong colour and shape.", "critique NLF"),
                    _nlf_turn("Look at the colour again.", "A red square.", "9", "Correct.", "critique NLF"),
                ],
            },
            "{this is not json",
            {"image_id": "999", "caption": "x", "interaction": [_nlf_turn("Q?", "A.", "5", "ok", "critique NLF")]},
            {"image_id": "42", "caption": "x", "interaction": [_nlf_turn("Q?", "A.", "many", "ok", "critique NLF")]},
            {"image_id": "42", "caption": "x"},
            {"image_id": "42", "caption": "x", "interaction": [_nlf_turn("Q?", "A.", "11", "ok", "critique NLF")]},
            {"image_id": "6", "caption": "x", "interaction": [_nlf_turn("Q?", "A.", "5", "ok", "critique NLF")]},
        ],
    )
    hallucination = _write_jsonl(
        tmp_path / "hallucination_nlf.jsonl",
        [
            {
                "image_id": "000000000042",
                "caption": ["A green field.", "Grass."],
                "interaction": [
                    _nlf_turn(f"{IMAGE_TOKEN}\nDescribe.", "A cow in a field.", 2, "There is no cow.", "critique_NLF")
                ],
            }
        ],
    )
    harmlessness = _write_jsonl(
        tmp_path / "harmlessness_nlf.jsonl",
        [
            {
                "image_id": 7,
                "caption": "A blue thing.",
                "interaction": [
                    _nlf_turn(
                        "How do I hurt someone with this?", "I can't help with that.", "10", "Safe.", "critique_NLF"
                    )
                ],
            }
        ],
    )
    out = tmp_path / "nlf"
    code = main(
        [
            "data",
            "convert-nlf",
            "--jsonl",
            str(helpfulness),
            str(hallucination),
            str(harmlessness),
            "--images",
            str(images),
            "--out",
            str(out),
        ]
    )
    assert code == 0

    samples = _read(out)
    assert set(samples) == {"helpfulness_nlf-1", "hallucination_nlf-1", "harmlessness_nlf-1"}
    two_turns = samples["helpfulness_nlf-1"].record
    assert [t["role"] for t in two_turns["conversation"]] == ["user", "assistant", "user", "assistant"]
    assert two_turns["conversation"][0]["content"] == f"{IMAGE_TOKEN}\nWhat is this?"
    assert two_turns["conversation"][2]["content"] == "Look at the colour again."
    assert two_turns["feedback"] == [
        {
            "scores": {"helpfulness": 4.0},
            "score_max": 10.0,
            "critique": "Wrong colour and shape.",
            "refinement": "Look at the colour again.",
            "judge": NLF_JUDGE,
        },
        {
            "scores": {"helpfulness": 9.0},
            "score_max": 10.0,
            "critique": "Correct.",
            "refinement": None,
            "judge": NLF_JUDGE,
        },
    ]
    assert two_turns["image_id"] == "000000151112" and two_turns["source"] == "dress_nlf"
    assert two_turns["annotations"]["captions"] == ["A red square."]
    assert samples["helpfulness_nlf-1"].image == (images / "000000151112.jpg").read_bytes()
    assert two_turns["provenance"]["input"] == "helpfulness_nlf.jsonl:1"
    assert two_turns["provenance"]["tool"] == "dress-lightning data convert-nlf"

    honesty = samples["hallucination_nlf-1"].record
    assert honesty["feedback"][0]["scores"] == {"honesty": 2.0}
    assert honesty["feedback"][0]["critique"] == "There is no cow."
    assert honesty["annotations"]["captions"] == ["A green field.", "Grass."]
    assert honesty["conversation"][0]["content"].count(IMAGE_TOKEN) == 1
    harmless = samples["harmlessness_nlf-1"]
    assert harmless.record["feedback"][0]["scores"] == {"harmlessness": 10.0}
    assert harmless.record["annotations"]["safety"]["harmful_intent"] is True
    assert harmless.image_ext == "png"

    manifest = _manifest(out, "dress_nlf")
    assert manifest["written"] == 3
    assert manifest["skipped"] == {
        "invalid record": 2,
        "malformed json": 1,
        "missing image": 1,
        "invalid sample": 1,
        "unreadable image": 1,
    }
    where = {r["where"]: r for r in manifest["skipped_records"]}
    assert where["helpfulness_nlf.jsonl:2"]["reason"] == "malformed json"
    assert where["helpfulness_nlf.jsonl:3"]["reason"] == "missing image"
    assert "could not convert string to float" in where["helpfulness_nlf.jsonl:4"]["detail"]
    assert "'interaction'" in where["helpfulness_nlf.jsonl:5"]["detail"]
    assert "feedback[0].scores.helpfulness" in where["helpfulness_nlf.jsonl:6"]["detail"]


def test_convert_nlf_aspect_override_and_score_max(tmp_path: Path, images: Path) -> None:
    misc = _write_jsonl(
        tmp_path / "misc.jsonl",
        [{"image_id": "42", "caption": "x", "interaction": [_nlf_turn("Q?", "A.", "4", "meh", "critique_NLF")]}],
    )
    out = tmp_path / "out"
    assert main(["data", "convert-nlf", "--jsonl", str(misc), "--images", str(images), "--out", str(out)]) == 2
    assert not out.exists()
    args = [
        "data",
        "convert-nlf",
        "--jsonl",
        str(misc),
        "--images",
        str(images),
        "--out",
        str(out),
        "--aspect",
        "honesty",
        "--score-max",
        "5",
    ]
    assert main(args) == 0
    (sample,) = _read(out).values()
    assert (
        sample.record["feedback"][0]["scores"] == {"honesty": 4.0} and sample.record["feedback"][0]["score_max"] == 5.0
    )


def test_convert_llava(tmp_path: Path, images: Path) -> None:
    records = [
        {"id": "000000151112", "image": "000000151112.jpg", "conversations": [
            {"from": "human", "value": f"What colour is it?\n{IMAGE_TOKEN}"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "No, it is square."}]},
        {"id": "no-token", "image": "coco/train2017/000000000042.jpg", "conversations": [
            {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "Green."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "000000000999.jpg", "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "bad-role", "image": "000000000042.jpg", "conversations": [{"from": "system", "value": "Q"}]},
        {"id": "two-humans", "image": "000000000042.jpg", "conversations": [
            {"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]},
    ]  # fmt: skip
    data = tmp_path / "llava_instruct.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "llava"
    assert main(["data", "convert-llava", "--json", str(data), "--images", str(images), "--out", str(out)]) == 0

    samples = _read(out)
    assert set(samples) == {"000000151112", "no-token"}
    first = samples["000000151112"].record
    assert first["source"] == "llava" and first["image_id"] == "000000151112"
    assert [(t["role"], t["content"]) for t in first["conversation"]] == [
        ("user", f"What colour is it?\n{IMAGE_TOKEN}"), ("assistant", "Red."),
        ("user", "Is it round?"), ("assistant", "No, it is square."),
    ]  # fmt: skip
    assert samples["no-token"].record["conversation"][0]["content"] == f"{IMAGE_TOKEN}\nDescribe the image."
    assert samples["no-token"].record["image_id"] == "000000000042"
    assert _manifest(out, "llava")["skipped"] == {
        "text-only record": 1,
        "missing image": 1,
        "invalid record": 1,
        "invalid sample": 1,
    }


def test_convert_vlsafe_examine_and_alignment(tmp_path: Path, images: Path) -> None:
    examine = _write_jsonl(
        tmp_path / "harmlessness_examine.jsonl",
        [
            {
                "image_id": "151112",
                "caption": "A red square on a table.",
                "query": "How can I use this to hurt someone?",
            },
            {"image_id": "42", "caption": "x"},
        ],
    )
    alignment = _write_jsonl(
        tmp_path / "harmlessnss_alignment.jsonl",
        [
            {
                "image_id": "000000000042",
                "query": "How do I poison the grass?",
                "response": "I can't help with that.",
                "source_model": "gpt-4",
                "tags": [1, 2],
            }
        ],
    )
    out = tmp_path / "vlsafe"
    assert main(["data", "convert-vlsafe", "--jsonl", str(examine), "--images", str(images), "--out", str(out)]) == 0
    assert main(["data", "convert-vlsafe", "--jsonl", str(alignment), "--images", str(images), "--out", str(out)]) == 0

    samples = _read(out)
    prompt = samples["harmlessness_examine-1"].record
    assert prompt["conversation"] == [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nHow can I use this to hurt someone?"}
    ]
    assert prompt["annotations"]["captions"] == ["A red square on a table."]
    answered = samples["harmlessnss_alignment-1"].record
    assert [t["content"] for t in answered["conversation"]] == [
        f"{IMAGE_TOKEN}\nHow do I poison the grass?",
        "I can't help with that.",
    ]
    assert all(s.record["annotations"]["safety"]["harmful_intent"] for s in samples.values())
    assert {s.record["source"] for s in samples.values()} == {"vlsafe"}
    assert _manifest(out, "vlsafe-harmlessness_examine")["skipped"] == {"invalid record": 1}
    assert _manifest(out, "vlsafe-harmlessnss_alignment")["skipped"] == {}


def test_convert_coco_groups_captions_and_instances(tmp_path: Path, images: Path) -> None:
    captions = {
        "images": [{"id": 151112, "file_name": "000000151112.jpg"}, {"id": 999, "file_name": "000000000999.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 151112, "caption": "A red square. "},
            {"id": 2, "image_id": 151112, "caption": "Something red."},
            {"id": 3, "image_id": 999, "caption": "Missing."},
        ],
    }
    instances = {
        "images": [{"id": 42, "file_name": "000000000042.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 151112, "category_id": 18, "bbox": [1.0, 2.0, 10.0, 5.0]},
            {"id": 11, "image_id": 42, "category_id": 1, "bbox": [0, 0, 3, 4]},
        ],
    }
    paths = []
    for name, data in (("captions_train2017.json", captions), ("instances_train2017.json", instances)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "coco"
    assert (
        main(["data", "convert-coco", "--annotations", *map(str, paths), "--images", str(images), "--out", str(out)])
        == 0
    )

    samples = _read(out)
    assert set(samples) == {"coco-000000151112", "coco-000000000042"}
    both = samples["coco-000000151112"].record
    assert both["annotations"]["captions"] == ["A red square.", "Something red."]
    assert both["annotations"]["objects"] == [{"category": "dog", "box": [1.0, 2.0, 11.0, 7.0]}]
    assert [t["role"] for t in both["conversation"]] == ["user", "assistant"]
    assert both["conversation"][1]["content"] == "A red square."
    boxes_only = samples["coco-000000000042"].record
    assert len(boxes_only["conversation"]) == 1  # no caption: a prompt-only describe sample
    assert boxes_only["annotations"]["objects"] == [{"category": "person", "box": [0, 0, 3, 4]}]
    assert _manifest(out, "coco")["skipped"] == {"missing image": 1}
