"""ShapeWorld: determinism, disjoint splits, images that match their annotations, honest answers."""

from __future__ import annotations

import io
import re
from collections import Counter

import pytest
from PIL import Image

from dress_lightning.data.phrases import NUMBER_WORDS, POSITION_PHRASES
from dress_lightning.data.schema import validate_sample
from dress_lightning.data.shapeworld import (
    BACKGROUND,
    COLORS,
    HARMFUL_INTENTS,
    POSITIONS,
    QUESTION_TYPES,
    REFUSAL_PREFIX,
    SHAPES,
    SIZES,
    _FIRST_TURN_WEIGHTS,
    first_turn_weights,
    generate_record,
    generate_sample,
    iter_shapeworld_text,
    sample_seed,
)
from dress_lightning.special_tokens import IMAGE_TOKEN

N = 300


@pytest.fixture(scope="module")
def samples():
    return [generate_sample("train", 7, i) for i in range(N)]


def test_same_arguments_give_identical_bytes_and_record() -> None:
    for index in (0, 1, 123):
        first, second = generate_sample("val", 3, index), generate_sample("val", 3, index)
        assert first.image == second.image
        assert first.record == second.record


def test_splits_and_seeds_draw_disjoint_streams() -> None:
    seeds = {split: {sample_seed(split, 0, i) for i in range(1000)} for split in ("train", "val", "test")}
    assert all(len(s) == 1000 for s in seeds.values())
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    images = {split: {generate_sample(split, 0, i).image for i in range(40)} for split in ("train", "val")}
    assert len(images["train"]) == 40 and not images["train"] & images["val"]
    assert generate_sample("train", 0, 5).image != generate_sample("train", 1, 5).image


def test_images_match_their_object_annotations(samples) -> None:
    for sample in samples[:60]:
        image = Image.open(io.BytesIO(sample.image)).convert("RGB")
        assert image.size == (128, 128)
        objects = sample.record["annotations"]["objects"]
        assert 1 <= len(objects) <= 4
        assert len({o["position"] for o in objects}) == len(objects)  # distinct cells
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            row, col = divmod(POSITIONS.index(obj["position"]), 3)
            cell = 128 // 3
            # The box lies inside the grid cell its position word names.
            assert col * cell <= x0 < x1 < (col + 1) * cell and row * cell <= y0 < y1 < (row + 1) * cell
            assert obj["category"] == obj["shape"] and obj["shape"] in SHAPES and obj["size"] in SIZES
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[obj["color"]]
        # Every drawn pixel lies inside some annotated box: no unannotated object.
        boxes = [o["box"] for o in objects]
        drawn = [(x, y) for y in range(0, 128, 2) for x in range(0, 128, 2) if image.getpixel((x, y)) != BACKGROUND]
        assert drawn and all(any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes) for x, y in drawn)


def test_image_size_is_configurable() -> None:
    sample = generate_sample("train", 0, 0, image_size=96)
    assert Image.open(io.BytesIO(sample.image)).size == (96, 96)
    assert all(v < 96 for o in sample.record["annotations"]["objects"] for v in o["box"])


def test_every_sample_is_valid_and_covers_all_question_types(samples) -> None:
    types = Counter()
    turns = Counter()
    for sample in samples:
        record = validate_sample(sample.record)
        conversation = record["conversation"]
        queries = record["annotations"]["queries"]
        assert len(queries) * 2 == len(conversation)  # one query per user turn, every turn answered
        assert conversation[0]["content"].startswith(f"{IMAGE_TOKEN}\n")
        types.update(q["type"] for q in queries)
        turns[len(queries)] += 1
        assert record["category"] == (queries[0]["type"] if len(queries) == 1 else "conversation")
    assert set(types) == set(QUESTION_TYPES)
    assert turns[1] > N * 0.6 and turns[2] > 0 and turns[3] > 0 and set(turns) == {1, 2, 3}


def _matches(objects, color, shape):
    return [o for o in objects if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]


def test_answers_agree_with_annotations(samples) -> None:
    seen = Counter()
    for sample in samples:
        record = sample.record
        objects = record["annotations"]["objects"]
        answers = [t["content"] for t in record["conversation"] if t["role"] == "assistant"]
        for query, answer in zip(record["annotations"]["queries"], answers, strict=True):
            kind = query["type"]
            if kind == "count":
                count = len(_matches(objects, query["color"], query["shape"]))
                assert re.search(rf"\b{NUMBER_WORDS[count]}\b", answer), (query, answer, objects)
                assert not any(re.search(rf"\b{w}\b", answer) for w in NUMBER_WORDS if w != NUMBER_WORDS[count])
                seen["count zero" if count == 0 else "count"] += 1
            elif kind == "exists":
                found = _matches(objects, query["color"], query["shape"])
                assert answer.startswith("Yes," if found else "No,"), (query, answer, objects)
                if not found:
                    assert f"there is no {query['color'] + ' ' if query['color'] else ''}{query['shape']}" in answer
                seen["exists absent" if not found else "exists present"] += 1
            elif kind == "color":
                (obj,) = [o for o in objects if o["position"] == query["position"]]
                assert obj["color"] in answer and query["shape"] == obj["shape"]
                assert not any(c in answer for c in COLORS if c != obj["color"])
            elif kind == "shape":
                (obj,) = [o for o in objects if o["position"] == query["position"]]
                assert answer.endswith(f"{obj['shape']}.") and not any(s in answer for s in SHAPES if s != obj["shape"])
            elif kind == "position":
                for obj in _matches(objects, query["color"], query["shape"]):
                    assert POSITION_PHRASES[obj["position"]] in answer
            elif kind == "harmful":
                assert record["annotations"]["safety"]["harmful_intent"] is True
                assert answer.startswith(REFUSAL_PREFIX) and query["intent"] in HARMFUL_INTENTS
                assert f"{query['color']} {query['shape']}" in answer  # stays grounded on the object
                assert _matches(objects, query["color"], query["shape"])  # and the object is really there
            elif kind == "describe":
                assert all(
                    f"{o['size']} {o['color']} {o['shape']} {POSITION_PHRASES[o['position']]}" in answer
                    for o in objects
                )
                assert re.search(rf"\b{NUMBER_WORDS[len(objects)]} shapes?\b", answer)
            if kind != "harmful":
                assert REFUSAL_PREFIX not in answer
        if record["category"] != "harmful":
            assert record["annotations"]["safety"]["harmful_intent"] is False
    assert seen["exists absent"] > 5 and seen["exists present"] > 5 and seen["count zero"] > 0


def test_captions_mention_every_object(samples) -> None:
    for sample in samples[:50]:
        first = sample.record["annotations"]["captions"][0].lower()
        for obj in sample.record["annotations"]["objects"]:
            assert f"{obj['color']} {obj['shape']}" in first


def test_text_iterator_is_deterministic_and_has_no_image_placeholder() -> None:
    texts = list(iter_shapeworld_text(20, seed=1))
    assert texts == list(iter_shapeworld_text(20, seed=1))
    assert texts != list(iter_shapeworld_text(20, seed=2))
    assert not any(IMAGE_TOKEN in t for t in texts)
    record, _ = generate_record("train", 1, 0)
    assert record["annotations"]["captions"][0] == texts[0]


def test_too_small_images_are_refused() -> None:
    with pytest.raises(ValueError, match="image_size must be at least"):
        generate_sample("train", 0, 0, image_size=16)


def test_harmful_share_gives_the_share_asked_for():
    for share in (0.02, 0.3):
        counts = Counter(generate_record("train", 0, i, harmful_share=share)[0]["category"] for i in range(3000))
        assert abs(counts["harmful"] / 3000 - share) < 0.02, (share, counts)
    record, _ = generate_record("train", 0, 5, harmful_share=0.3)
    assert record["provenance"]["harmful_share"] == 0.3


def test_question_types_restrict_the_first_question_and_the_default_mix_is_unchanged():
    assert first_turn_weights() is _FIRST_TURN_WEIGHTS
    assert {generate_sample("test", 11, i, question_types=["describe"]).record["category"] for i in range(40)} == {
        "describe"
    }
    with pytest.raises(ValueError, match="unknown ShapeWorld question types"):
        first_turn_weights(["colour"])
    with pytest.raises(ValueError, match="fraction"):
        first_turn_weights(harmful_share=1.5)
