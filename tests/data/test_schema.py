"""Shard schema: validation messages name the field and key; samples survive a real shard round trip."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from PIL import Image

from dress_lightning.data.schema import (
    IMAGE_KEYS,
    JSON_KEY,
    SCHEMA_VERSION,
    Sample,
    SampleRecord,
    SampleValidationError,
    alternating_turns,
    build_record,
    decode_sample,
    encode_sample,
    ensure_image_token,
    sample_key,
    validate_sample,
)
from dress_lightning.data.shards import iter_samples, write_samples
from dress_lightning.data.skips import SkipLog
from dress_lightning.special_tokens import IMAGE_TOKEN


def _png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(sample_id: str = "nlf.sample/1") -> SampleRecord:
    """A record using every optional field: three turns of feedback, one of them null."""
    judge = {"name": "gpt-4", "version": "test"}
    return build_record(
        sample_id=sample_id,
        source="dress_nlf",
        image_id="000000151112",
        conversation=alternating_turns(
            [
                f"{IMAGE_TOKEN}\nWhat is on the table?",
                "A cat.",
                "Look again: it is a dog.",
                "A dog.",
                "Say more.",
                "A brown dog.",
            ]
        ),
        captions=["A dog on a table."],
        objects=[{"category": "dog", "box": [1.5, 2.0, 30.0, 40.0]}],
        queries=[{"type": "describe"}],
        category="helpfulness",
        feedback=[
            {
                "scores": {"helpfulness": 2.0, "honesty": 1.0},
                "score_max": 10.0,
                "critique": "Wrong animal.",
                "refinement": "Look again: it is a dog.",
                "judge": judge,
            },
            None,
            {
                "scores": {"helpfulness": 9.0},
                "score_max": 10.0,
                "critique": "Good.",
                "refinement": None,
                "judge": judge,
            },
        ],
        provenance={"tool": "test", "seed": 3},
    ) | {"extra_field": {"kept": True}}


def test_build_record_sets_version_and_omits_unset_optionals() -> None:
    record = build_record(
        sample_id="a", source="coco", image_id="1", conversation=alternating_turns([f"{IMAGE_TOKEN}\nHi"])
    )
    assert record["schema_version"] == SCHEMA_VERSION
    assert record["annotations"] == {"captions": [], "objects": [], "safety": {"harmful_intent": False}}
    assert not {"category", "feedback", "provenance"} & record.keys()
    validate_sample(record)  # a prompt-only sample is valid


def test_sample_key_has_no_dots_or_slashes() -> None:
    assert sample_key("coco/train2017/000000151112.jpg") == "coco_train2017_000000151112_jpg"
    assert sample_key("shapeworld-train-s0-0000001") == "shapeworld-train-s0-0000001"


def test_ensure_image_token_prepends_only_when_missing() -> None:
    assert ensure_image_token("Describe it.") == f"{IMAGE_TOKEN}\nDescribe it."
    assert ensure_image_token(f"Describe it.\n{IMAGE_TOKEN}") == f"Describe it.\n{IMAGE_TOKEN}"


def test_round_trip_through_a_real_shard(tmp_path: Path) -> None:
    samples = [
        Sample(record=_record("nlf.sample/1"), image=_png(), image_ext="png"),
        Sample(record=_record("second"), image=_png((0, 0, 255)), image_ext="png"),
    ]
    report = write_samples(
        ((s.record["id"], s) for s in samples), lambda s: s, tmp_path, "roundtrip", shard_size=1, tool="test"
    )
    assert report.written == 2 and [p.name for p in report.shards] == ["roundtrip-000000.tar", "roundtrip-000001.tar"]

    raw = list(wds.WebDataset([str(p) for p in report.shards], shardshuffle=False))
    assert [r["__key__"] for r in raw] == ["nlf_sample_1", "second"]
    assert set(raw[0]) >= {"__key__", JSON_KEY, "png"}
    decoded = [decode_sample(r) for r in raw]
    assert decoded == samples
    assert decoded[0].record["extra_field"] == {"kept": True}

    skips = SkipLog()
    assert list(iter_samples([str(p) for p in report.shards], skips)) == samples
    assert skips.records == []


def test_encode_sample_gives_bytes_members() -> None:
    sample = Sample(record=_record(), image=_png(), image_ext="png")
    members = encode_sample(sample)
    assert members["__key__"] == "nlf_sample_1"
    assert members["png"] == sample.image
    assert decode_sample(members) == sample


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Mutation that sets a dotted/indexed field, e.g. ``conversation.1.role``."""

    def mutate(record: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = record
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _delete(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda record: record.pop(name)


@pytest.mark.parametrize(
    ("mutate", "path", "problem"),
    [
        (_delete("id"), "id", "missing"),
        (_set("source", ""), "source", "must not be empty"),
        (_set("schema_version", 99), "schema_version", "reads version 1"),
        (_set("schema_version", True), "schema_version", "expected int"),
        (_set("conversation.2.role", "gpt"), "conversation[2].role", "expected 'user'"),
        (_set("conversation.1.role", "user"), "conversation[1].role", "expected 'assistant'"),
        (_set("conversation.0.content", "no placeholder"), "conversation[0].content", "exactly one <image>"),
        (_set("conversation.0.content", "<image><image>"), "conversation[0].content", "found 2"),
        (_set("conversation.3.content", "<image> again"), "conversation[3].content", "only the first user turn"),
        (_set("conversation.4.content", 7), "conversation[4].content", "expected str"),
        (_set("conversation", []), "conversation", "at least one user turn"),
        (_set("annotations.captions", "a caption"), "annotations.captions", "expected list"),
        (_set("annotations.objects.0.box", [0, 0, 5]), "annotations.objects[0].box", "got 3 values"),
        (_set("annotations.objects.0.box", [9, 0, 5, 5]), "annotations.objects[0].box", "x0 <= x1"),
        (_set("annotations.objects.0.box", [0, 0, "5", 5]), "annotations.objects[0].box[2]", "finite number"),
        (_set("annotations.safety", {}), "annotations.safety.harmful_intent", "missing"),
        (_set("annotations.safety.harmful_intent", "yes"), "annotations.safety.harmful_intent", "expected bool"),
        (_set("annotations.queries", [{"type": "describe"}] * 4), "annotations.queries", "4 queries for 3 user turns"),
        (_set("annotations.queries.0", {"shape": "circle"}), "annotations.queries[0].type", "missing"),
        (_set("feedback", [None, None]), "feedback", "one entry per assistant turn (3), got 2"),
        (_set("feedback.0.scores", {"kindness": 3.0}), "feedback[0].scores.kindness", "unknown aspect"),
        (_set("feedback.0.scores", {"honesty": 11.0}), "feedback[0].scores.honesty", "outside [0, score_max=10]"),
        (_set("feedback.0.scores", {"honesty": float("nan")}), "feedback[0].scores.honesty", "finite number"),
        (_set("feedback.2.score_max", 0), "feedback[2].score_max", "must be positive"),
        (_set("feedback.2.refinement", 3), "feedback[2].refinement", "expected str or null"),
        (_set("feedback.2.judge", {"name": "gpt-4"}), "feedback[2].judge.version", "missing"),
        (_set("category", 5), "category", "expected str"),
    ],
)
def test_validation_error_names_field_path_and_key(
    mutate: Callable[[dict[str, Any]], None], path: str, problem: str
) -> None:
    record = copy.deepcopy(_record())
    validate_sample(record)  # the unmutated record is valid
    mutate(record)
    with pytest.raises(SampleValidationError) as caught:
        validate_sample(record, key="the-key")
    assert caught.value.path == path
    assert caught.value.key == "the-key"
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"sample 'the-key': {path}: ")


def test_validation_error_defaults_to_record_id() -> None:
    record = copy.deepcopy(_record("some-id"))
    record["conversation"][1]["role"] = "gpt"
    with pytest.raises(SampleValidationError, match=r"^sample 'some-id': conversation\[1\]\.role"):
        validate_sample(record)


def test_decode_sample_rejects_broken_members() -> None:
    members = encode_sample(Sample(record=_record(), image=_png(), image_ext="png"))
    no_image = {k: v for k, v in members.items() if k not in IMAGE_KEYS}
    with pytest.raises(SampleValidationError, match="'nlf_sample_1': image: expected exactly one"):
        decode_sample(no_image)
    with pytest.raises(SampleValidationError, match="json: not valid JSON"):
        decode_sample(members | {JSON_KEY: b"{not json"})
    with pytest.raises(SampleValidationError, match="json: shard member missing"):
        decode_sample({k: v for k, v in members.items() if k != JSON_KEY})
