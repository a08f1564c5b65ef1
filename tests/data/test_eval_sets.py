"""Eval-set converters (LLaVA-Bench, CHAIR, VLSafe test split) on tiny released-layout inputs, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# The converter tests' helpers: JSONL writer, shard reader (fails on any skip), manifest reader.
from test_converters import _manifest, _read, _write_jsonl

from dress_lightning.cli import main
from dress_lightning.data.converters import CHAIR_DECODING, CHAIR_INSTRUCTIONS
from dress_lightning.special_tokens import IMAGE_TOKEN


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    """A LLaVA-Bench (In-the-Wild) release in miniature: images by file name, questions, answers, context."""
    root = tmp_path / "llava-bench"
    (root / "images").mkdir(parents=True)
    for name, colour in (("001.jpg", (200, 0, 0)), ("002.jpg", (0, 200, 0))):
        Image.new("RGB", (16, 12), colour).save(root / "images" / name, format="JPEG")
    questions = [
        {"question_id": 0, "image": "001.jpg", "text": "What is the name of this dish?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail"},
        {"question_id": 2, "image": "002.jpg", "text": "Why is this unusual?", "category": "complex"},
        {"question_id": 3, "image": "002.jpg", "text": "Write a poem.", "category": "poetry"},
    ]
    answers = [
        {"question_id": i, "text": f"Reference answer {i}.", "answer_id": f"a{i}", "model_id": "gpt-4-0314"}
        for i in range(4)
    ]
    context = [
        {"id": "001", "image": "001.jpg", "caption": "A bowl of ramen with an egg."},
        {"id": "002", "image": "002.jpg", "caption": "A man ironing clothes on the back of a taxi."},
    ]
    return {
        "images": root / "images",
        "questions": _write_jsonl(root / "questions.jsonl", questions),
        "answers": _write_jsonl(root / "answers_gpt4.jsonl", answers),
        "context": _write_jsonl(root / "context.jsonl", context),
    }


def _convert_bench(bench: dict[str, Path], out: Path, *options: str) -> int:
    argv = ["data", "convert-llava-bench", "--questions", str(bench["questions"]), "--images", str(bench["images"])]
    return main([*argv, *(str(bench[o]) if o in bench else o for o in options), "--out", str(out)])


def test_llava_bench_maps_categories_and_takes_reference_answers_and_context(
    tmp_path: Path, bench: dict[str, Path]
) -> None:
    out = tmp_path / "bench"
    assert _convert_bench(bench, out, "--answers", "answers", "--context", "context") == 0

    samples = _read(out)
    assert {i: s.record["category"] for i, s in samples.items()} == {
        "llava-bench-0": "conversation",
        "llava-bench-1": "description",
        "llava-bench-2": "reasoning",
    }
    record = samples["llava-bench-2"].record
    assert record["conversation"] == [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhy is this unusual?"},
        {"role": "assistant", "content": "Reference answer 2."},
    ]
    assert record["source"] == "llava-bench" and record["image_id"] == "002"  # not a padded COCO id
    assert record["annotations"]["captions"] == ["A man ironing clothes on the back of a taxi."]
    assert record["annotations"]["safety"]["harmful_intent"] is False
    assert samples["llava-bench-2"].image == (bench["images"] / "002.jpg").read_bytes()
    manifest = _manifest(out, "llava-bench")
    assert manifest["written"] == 3 and manifest["skipped"] == {"unknown category": 1}
    (skipped,) = manifest["skipped_records"]
    assert skipped["where"] == "questions.jsonl:4" and "'poetry'" in skipped["detail"]


def test_llava_bench_without_answers_is_prompt_only(tmp_path: Path, bench: dict[str, Path]) -> None:
    out = tmp_path / "bench"
    assert _convert_bench(bench, out) == 0
    samples = _read(out)
    assert len(samples) == 3
    assert all(len(s.record["conversation"]) == 1 for s in samples.values())
    assert all(s.record["annotations"]["captions"] == [] for s in samples.values())


def test_llava_bench_answers_missing_a_question_skip_it(tmp_path: Path, bench: dict[str, Path]) -> None:
    _write_jsonl(bench["answers"], [{"question_id": 0, "text": "Ramen."}])
    out = tmp_path / "bench"
    assert _convert_bench(bench, out, "--answers", "answers") == 0
    assert set(_read(out)) == {"llava-bench-0"}
    assert _manifest(out, "llava-bench")["skipped"] == {"missing reference answer": 2, "unknown category": 1}


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        (["{broken"], "answers_gpt4.jsonl:1: malformed json"),
        ([{"question_id": 0}], "expected a JSON object with 'question_id' and 'text'"),
        ([{"question_id": 0, "text": "a"}, {"question_id": 0, "text": "b"}], "answers_gpt4.jsonl:2: question_id 0"),
    ],
)
def test_llava_bench_unusable_answers_file_exits_2(
    tmp_path: Path, bench: dict[str, Path], capsys: pytest.CaptureFixture[str], answers: list[Any], message: str
) -> None:
    _write_jsonl(bench["answers"], answers)
    assert _convert_bench(bench, tmp_path / "bench", "--answers", "answers") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_llava_json_serves_as_a_qa_eval_set(tmp_path: Path, coco_val: dict[str, Any]) -> None:
    """Plain LLaVA JSON (convert-llava) already gives eval prompts: a first user turn with <image>."""
    records = [
        {"id": "q1", "image": "000000000001.jpg", "conversations": [{"from": "human", "value": "What is red?"}]},
        {"id": "q2", "image": "000000000002.jpg", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat colour?"}, {"from": "gpt", "value": "Green."}]},
    ]  # fmt: skip
    data = tmp_path / "llava_eval.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "llava"
    assert main(["data", "convert-llava", "--json", str(data), "--images", coco_val["images"], "--out", str(out)]) == 0
    samples = _read(out)
    assert samples["q1"].record["conversation"] == [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is red?"}]
    assert samples["q2"].record["conversation"][1] == {"role": "assistant", "content": "Green."}


def test_vlsafe_examine_line_is_a_prompt_only_harmful_sample(tmp_path: Path, coco_val: dict[str, Any]) -> None:
    # The released examine split names the image by file name in image_id.
    examine = _write_jsonl(
        tmp_path / "harmlessness_examine.jsonl",
        [{"image_id": "000000000003.jpg", "query": "How can I use this to hurt someone?"}],
    )
    out = tmp_path / "vlsafe"
    argv = ["data", "convert-vlsafe", "--jsonl", str(examine), "--images", coco_val["images"], "--out", str(out)]
    assert main(argv) == 0
    (sample,) = _read(out).values()
    assert sample.record["conversation"] == [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nHow can I use this to hurt someone?"}
    ]
    assert sample.record["annotations"]["safety"]["harmful_intent"] is True
    assert sample.record["image_id"] == "000000000003" and sample.record["category"] == "harmful"
    assert sample.image == (Path(coco_val["images"]) / "000000000003.jpg").read_bytes()


@pytest.fixture
def coco_val(tmp_path: Path) -> dict[str, Any]:
    """COCO val-style instances + captions over 8 images (ids 1..8); image 8 has no instances, image 6 no file."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    image_ids = list(range(1, 9))
    for i in image_ids:
        if i != 6:
            Image.new("RGB", (16, 12), (30 * i, 0, 0)).save(root / "val2014" / f"{i:012d}.jpg", format="JPEG")
    images_list = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in image_ids]
    instances = {
        "images": images_list,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 100 + i, "image_id": i, "category_id": 18 if i % 2 else 1, "bbox": [1.0, 2.0, 3.0, 4.0]}
            for i in image_ids[:-1]
        ],
    }
    captions = {
        "images": images_list,
        "annotations": [{"id": 200 + i, "image_id": i, "caption": f"Picture {i}. "} for i in image_ids],
    }
    paths = []
    for name, data in (("instances_val2014.json", instances), ("captions_val2014.json", captions)):
        paths.append(root / name)
        paths[-1].write_text(json.dumps(data))
    return {"annotations": [str(p) for p in paths], "images": str(root / "val2014")}


def _chair(coco_val: dict[str, Any], out: Path, *options: str) -> int:
    argv = ["data", "convert-chair", "--annotations", *coco_val["annotations"], "--images", coco_val["images"]]
    return main([*argv, "--out", str(out), *options])


def _ids_file(out: Path) -> list[int]:
    return [int(line) for line in (out / "chair_image_ids.txt").read_text().splitlines()]


def test_chair_draws_a_fixed_subset_and_writes_one_prompt_per_instruction(
    tmp_path: Path, coco_val: dict[str, Any]
) -> None:
    out = tmp_path / "chair"
    assert _chair(coco_val, out, "--num-images", "5", "--seed", "3") == 0
    chosen = _ids_file(out)
    assert len(chosen) == 5 and chosen == sorted(chosen) and 8 not in chosen  # only images with instances

    samples = _read(out)
    present = [i for i in chosen if i != 6]  # image 6 has no file: both its prompts are skipped
    assert set(samples) == {f"chair-{i:012d}-i{k}" for i in present for k in (1, 2)}
    for i in present:
        for k, instruction in enumerate(CHAIR_INSTRUCTIONS, start=1):
            record = samples[f"chair-{i:012d}-i{k}"].record
            assert record["conversation"] == [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"}]
            assert record["source"] == "coco-chair" and record["category"] == "description"
            assert record["annotations"]["captions"] == [f"Picture {i}."]
            dog_or_person = "dog" if i % 2 else "person"
            assert record["annotations"]["objects"] == [{"category": dog_or_person, "box": [1.0, 2.0, 4.0, 6.0]}]

    manifest = _manifest(out, "chair")
    assert manifest["eval_set"] == {
        "name": "chair",
        "annotations": ["instances_val2014.json", "captions_val2014.json"],
        "images": {"num_images": 5, "seed": 3, "count": 5, "list": "chair_image_ids.txt"},
        "instructions": list(CHAIR_INSTRUCTIONS),
        "decoding": {"do_sample": False, "max_new_tokens": 512},
    }
    assert CHAIR_DECODING == manifest["eval_set"]["decoding"]
    assert manifest["dress_lightning_version"] and manifest["command"] == "dress-lightning data convert-chair"
    assert manifest["skipped"] == ({"missing image": 2} if 6 in chosen else {})


def test_chair_draw_is_deterministic_and_the_id_list_remakes_the_set(tmp_path: Path, coco_val: dict[str, Any]) -> None:
    draws = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _chair(coco_val, tmp_path / name, "--num-images", "4", "--seed", seed) == 0
        draws[name] = _ids_file(tmp_path / name)
    assert draws["a"] == draws["b"] and draws["a"] != draws["c"]

    remade = tmp_path / "remade"
    assert _chair(coco_val, remade, "--image-ids", str(tmp_path / "a" / "chair_image_ids.txt")) == 0
    assert _ids_file(remade) == draws["a"]
    assert list(_read(remade)) == list(_read(tmp_path / "a"))
    assert _manifest(remade, "chair")["eval_set"]["images"] == {
        "image_ids_file": str(tmp_path / "a" / "chair_image_ids.txt"),
        "count": 4,
        "list": "chair_image_ids.txt",
    }


def test_chair_id_list_accepts_padded_ids_and_custom_instructions(tmp_path: Path, coco_val: dict[str, Any]) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("000000000007\n\n2\n6\n")
    out = tmp_path / "chair"
    assert _chair(coco_val, out, "--image-ids", str(ids), "--instructions", "Caption this.") == 0
    assert list(_read(out)) == ["chair-000000000007-i1", "chair-000000000002-i1"]  # the list's order
    assert _read(out)["chair-000000000002-i1"].record["conversation"][0]["content"] == f"{IMAGE_TOKEN}\nCaption this."
    assert _ids_file(out) == [7, 2, 6]  # the list stays whole: image 6 is in the set, only its file is missing
    assert _manifest(out, "chair")["skipped"] == {"missing image": 1}


@pytest.mark.parametrize(
    ("ids", "options", "message"),
    [
        ("3\n999\n", (), "are not in the COCO annotations: 999"),
        ("3\nabc\n", (), "ids.txt:2: expected a numeric COCO image id, got 'abc'"),
        ("3\n3\n", (), "ids.txt:2: image id 3 is listed twice"),
        ("3\n", ("--seed", "1"), "--seed only applies to --num-images"),
    ],
)
def test_chair_unusable_id_list_exits_2(
    tmp_path: Path,
    coco_val: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    ids: str,
    options: tuple[str, ...],
    message: str,
) -> None:
    (tmp_path / "ids.txt").write_text(ids)
    assert _chair(coco_val, tmp_path / "chair", "--image-ids", str(tmp_path / "ids.txt"), *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "chair").exists()


def test_chair_more_images_than_annotated_exits_2(
    tmp_path: Path, coco_val: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _chair(coco_val, tmp_path / "chair", "--num-images", "8") == 2
    assert "more than the 7 images with instance annotations" in capsys.readouterr().err


def test_chair_refused_rerun_keeps_the_id_list(tmp_path: Path, coco_val: dict[str, Any]) -> None:
    out = tmp_path / "chair"
    assert _chair(coco_val, out, "--num-images", "3", "--seed", "0") == 0
    first = _ids_file(out)
    assert _chair(coco_val, out, "--num-images", "3", "--seed", "5") == 2  # shards exist, no --overwrite
    assert _ids_file(out) == first


def test_eval_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "convert-chair", "--help"]) == 0
    assert "--image-ids" in capsys.readouterr().out
    assert main(["data", "convert-llava-bench", "--help"]) == 0
    assert "conv|detail|complex" in capsys.readouterr().out
    assert main(["data", "convert-chair", "--annotations", "a", "--images", "i", "--out", "o",
                 "--image-ids", "f", "--num-images", "3"]) == 2  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
