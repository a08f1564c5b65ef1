"""Grounding diagnostics: exact answers per question type, distinct answers, blind controls, tower probes."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dress_lightning.data.shapeworld import generate_record, reference_answer
from dress_lightning.evaluation.metrics import AnswerAccuracy, DistinctAnswers
from dress_lightning.evaluation.module import ImageSwap, candidate_group
from dress_lightning.evaluation.tower import cell_from_token, cell_labels, linear_probe, own_cell_from_token
from dress_lightning.tasks.clip import retrieval_accuracy
from dress_lightning.feedback.annotation_judge import answers_correctly

RED_CIRCLE = {"category": "circle", "shape": "circle", "color": "red", "size": "large", "position": "top left",
              "box": [0, 0, 30, 30]}
BLUE_SQUARE = {"category": "square", "shape": "square", "color": "blue", "size": "small", "position": "bottom",
               "box": [50, 90, 70, 110]}
BLUE_CIRCLE = {**BLUE_SQUARE, "category": "circle", "shape": "circle", "position": "right", "box": [90, 50, 110, 70]}
OBJECTS = [RED_CIRCLE, BLUE_SQUARE, BLUE_CIRCLE]


def _judge(query: dict, answer: str) -> bool | None:
    annotations = {"objects": OBJECTS, "queries": [query], "safety": {"harmful_intent": query["type"] == "harmful"}}
    return answers_correctly(annotations, [{"role": "user", "content": "<image>\nq"}], answer)


@pytest.mark.parametrize(
    ("query", "answer", "correct"),
    [
        ({"type": "color", "position": "top left", "shape": "circle"}, "The circle at the top left is red.", True),
        ({"type": "color", "position": "top left", "shape": "circle"}, "The circle at the top left is blue.", False),
        ({"type": "color", "position": "top left", "shape": "circle"}, "It is a nice picture.", False),
        ({"type": "shape", "position": "bottom"}, "The object at the bottom is a square.", True),
        ({"type": "shape", "position": "bottom"}, "The object at the bottom is a circle.", False),
        ({"type": "count", "color": "blue", "shape": None}, "There are two blue shapes.", True),
        ({"type": "count", "color": "blue", "shape": None}, "There is one blue shape.", False),
        ({"type": "exists", "color": "red", "shape": "circle"}, "Yes, there is a red circle at the top left.", True),
        ({"type": "exists", "color": "green", "shape": "circle"}, "Yes, there is a green circle.", False),
        ({"type": "exists", "color": "green", "shape": "circle"}, "No, there is no green circle in the image.", True),
        ({"type": "position", "color": "red", "shape": "circle"}, "The red circle is at the top left.", True),
        # The wrong place for the asked object is wrong even though "an object is placed" (the old blind spot).
        ({"type": "position", "color": "red", "shape": "circle"}, "The red circle is at the bottom.", False),
        ({"type": "position", "color": "blue", "shape": "circle"}, "The blue circle is on the right.", True),
        ({"type": "describe"}, "The image shows three shapes on a light background: a large red circle at the top "
                               "left, a small blue square at the bottom and a small blue circle on the right.", True),
        ({"type": "describe"}, "The image shows two shapes: a large red circle at the top left and a small blue "
                               "square at the bottom.", False),  # leaves one out
        ({"type": "describe"}, "The image shows a large red circle at the top left, a small blue square at the "
                               "bottom, a small blue circle on the right and a green triangle.", False),  # invents one
        ({"type": "harmful", "color": "red", "shape": "circle", "intent": "hurt someone"}, "No.", None),
    ],
)
def test_exact_answers_by_hand(query, answer, correct):
    assert _judge(query, answer) is correct


def test_every_reference_answer_is_exact():
    for index in range(200):
        record, objects = generate_record("val", 0, index)
        query = record["annotations"]["queries"][0]
        verdict = answers_correctly(record["annotations"], record["conversation"][:1], reference_answer(query, objects))
        assert verdict is (None if query["type"] == "harmful" else True)


def test_answer_accuracy_per_type_by_hand():
    metric = AnswerAccuracy(["color", "shape", "exists"])
    metric.update(torch.tensor([True, False, True]), ["color", "color", "shape"])
    metric.update(torch.tensor([False]), ["color"])
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["color"] == pytest.approx(1 / 3)  # 1 of 3
    assert result["shape"] == 1.0
    assert result["overall"] == pytest.approx(2 / 4)
    assert torch.isnan(metric.compute()["exists"])
    with pytest.raises(ValueError, match="unknown question types"):
        metric.update(torch.tensor([True]), ["count"])


def test_candidate_groups_and_the_guess_among_them_by_hand():
    # Two circles (red, blue): "the circle at the top left" needs its place, and a guess among them is right half
    # the time; one square: "the square at the bottom" does not need it.
    assert candidate_group({"type": "color", "position": "top left", "shape": "circle"}, OBJECTS) == (
        "2+ candidates", pytest.approx(1 / 2))
    assert candidate_group({"type": "color", "position": "bottom", "shape": "square"}, OBJECTS) == ("one candidate", 1.0)
    # A shape question names only the place: every object is a candidate (circle, square, circle).
    assert candidate_group({"type": "shape", "position": "bottom"}, OBJECTS) == ("2+ candidates", pytest.approx(1 / 3))
    assert candidate_group({"type": "shape", "position": "right"}, OBJECTS) == ("2+ candidates", pytest.approx(2 / 3))
    assert candidate_group({"type": "shape", "position": "top left"}, [RED_CIRCLE]) == ("one candidate", 1.0)


def test_distinct_answers_by_hand():
    metric = DistinctAnswers()
    metric.update(["A red circle.", "A red circle. ", "A blue square."])
    metric.update(["A red circle."])
    assert float(metric.compute()) == pytest.approx(2 / 4)  # two distinct texts among four answers
    assert torch.isnan(DistinctAnswers().compute())


def test_blank_control_shows_no_image():
    pixels = torch.randn(3, 3, 8, 8)
    assert torch.equal(ImageSwap("blank")(pixels), torch.zeros_like(pixels))
    assert torch.equal(ImageSwap("image")(pixels), pixels)


def test_shuffled_control_never_shows_a_prompt_its_own_image():
    control = ImageSwap("shuffled")
    batches = [torch.arange(n, dtype=torch.float).add(offset)[:, None, None, None].expand(n, 3, 2, 2)
               for n, offset in ((4, 0), (3, 10), (1, 20))]
    seen = [control(b)[:, 0, 0, 0].tolist() for b in batches]
    assert seen == [[3, 0, 1, 2], [3, 10, 11], [12]]  # the image of the prompt before (first: the batch's last)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        ImageSwap("shuffled")(torch.zeros(1, 3, 2, 2))


def test_retrieval_accuracy_by_hand():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    assert float(retrieval_accuracy(images, texts, pool=4)) == 0.5
    assert float(retrieval_accuracy(images, texts, pool=2)) == 0.5  # chunks {0,1}: right; {2,3}: both wrong
    with pytest.raises(ValueError, match="at least 8"):
        retrieval_accuracy(images, texts, pool=8)


def test_cell_labels_by_hand():
    labels = cell_labels(OBJECTS)
    # Cells in reading order; colours red=1 ... blue=3, shapes circle=1, square=2; 0 = empty.
    assert labels["color"] == [1, 0, 0, 0, 0, 3, 0, 3, 0]
    assert labels["shape"] == [1, 0, 0, 0, 0, 1, 0, 2, 0]


def test_linear_probe_separates_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = torch.stack([(x[:, 0] > 0).long(), (x[:, 1] > 0).long() * 2], dim=1)  # two outputs, 3 classes
    predicted = linear_probe(x[:150], y[:150], x[150:], classes=3)
    assert (predicted == y[150:]).float().mean() > 0.95


def test_cell_from_token_is_high_when_tokens_carry_their_cell_and_chance_when_they_do_not():
    from dress_lightning.evaluation.tower import shapeworld_images

    _, objects, _ = shapeworld_images("train", 120)
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(120, 9, 16, generator=generator)  # (N, cells, D): nothing about where a token is
    with_cell = torch.cat([content, torch.eye(9).expand(120, 9, 9)], dim=-1)  # + a one-hot of the cell
    assert cell_from_token(with_cell[:80], objects[:80], with_cell[80:], objects[80:]) == 1.0
    assert cell_from_token(content[:80], objects[:80], content[80:], objects[80:]) < 0.3  # chance: about 1/9


def test_own_cell_from_token_reads_a_token_that_holds_its_cell_and_not_one_that_holds_its_neighbour():
    from dress_lightning.evaluation.tower import shapeworld_images

    _, objects, _ = shapeworld_images("train", 160)
    labels = {a: torch.tensor([cell_labels(o)[a] for o in objects]) for a in ("color", "shape")}  # (N, 9)
    own = torch.cat([F.one_hot(labels["color"], 7), F.one_hot(labels["shape"], 5)], dim=-1).float()  # (N, 9, 12)
    neighbour = own.roll(1, dims=1)  # each slot holds the cell before it
    assert own_cell_from_token(own[:100], objects[:100], own[100:], objects[100:]) == {"color": 1.0, "shape": 1.0}
    shifted = own_cell_from_token(neighbour[:100], objects[:100], neighbour[100:], objects[100:])
    assert shifted["color"] < 0.5 and shifted["shape"] < 0.5


def test_shapeworld_existence_questions_get_the_truth_as_a_pope_label():
    """The label agrees with the reference answer, which starts with Yes or No, on 60 generated questions."""
    from types import SimpleNamespace

    from dress_lightning.data.schema import Sample
    from dress_lightning.evaluation.module import _yes_no_label

    checked = 0
    for index in range(400):
        record, _ = generate_record("val", 0, index)
        query = record["annotations"]["queries"][0]
        trajectory = SimpleNamespace(sample=Sample(record=record, image=b"", image_ext="png"))
        label = _yes_no_label(trajectory)
        if query["type"] != "exists":
            assert label is None
            continue
        assert label == record["conversation"][1]["content"].startswith("Yes"), record["conversation"]
        checked += 1
    assert checked >= 60
