"""CHAIR synonym matching: canonical categories, plurals, compound phrases, ShapeWorld shapes."""

from __future__ import annotations

import pytest

from dress_lightning.data.phrases import plural
from dress_lightning.data.shapeworld import SHAPES
from dress_lightning.feedback.synonyms import (
    COCO,
    COCO_SYNONYMS,
    SHAPEWORLD,
    mentioned_objects,
    object_mentions,
)


def test_coco_has_its_80_categories():
    assert len(COCO_SYNONYMS) == 80
    assert len(COCO_SYNONYMS["person"]) > 50 and {"man", "woman", "boy", "girl", "people", "child"} <= set(
        COCO_SYNONYMS["person"]
    )


@pytest.mark.parametrize(
    ("text", "objects"),
    [
        ("A man riding a bike down the street.", {"person", "bicycle"}),
        ("Two women and three children walk their puppies past the buses.", {"person", "dog", "bus"}),
        ("A hot dog and a teddy bear on the toilet seat.", {"hot dog", "teddy bear", "toilet"}),
        ("A baby elephant next to wine glasses and knives.", {"elephant", "wine glass", "knife"}),
        ("A kitten sleeps on the sofa near the TV.", {"cat", "couch", "tv"}),
        ("An empty room with white walls.", set()),
    ],
)
def test_mentioned_objects(text, objects):
    assert mentioned_objects(text, COCO) == objects


def test_mentions_keep_order_and_repeats():
    assert object_mentions("A dog chases a puppy past a man.") == ["dog", "dog", "person"]


def test_canonical_names_and_plurals():
    assert COCO.canonical("Dining Table") == "dining table"
    assert COCO.canonical("bike") == "bicycle"
    assert COCO.canonical("spaceship") is None
    assert [plural(w) for w in ("bus", "puppy", "knife", "policeman", "wine glass", "sheep")] == [
        "buses",
        "puppies",
        "knives",
        "policemen",
        "wine glasses",
        "sheep",
    ]


def test_shapeworld_vocabulary():
    assert mentioned_objects("Two red circles, a square and three diamonds.", SHAPEWORLD) == {
        "circle",
        "square",
        "diamond",
    }
    assert {SHAPEWORLD.canonical(s) for s in SHAPES} == set(SHAPES)
