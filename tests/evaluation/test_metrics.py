"""The evaluation metrics on hand-computed cases, across 2 gloo ranks and inside a Lightning loop."""

from __future__ import annotations

import datetime
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from dress_lightning.evaluation.metrics import (
    CHAIR,
    AspectScore,
    RefinementGain,
    SafetyRate,
    ScoreByTurn,
    shapeworld_object_counts,
)
from dress_lightning.feedback.synonyms import COCO, SHAPEWORLD, annotated_objects

nan = math.nan
DRESS_CATEGORIES = ["conversation", "description", "reasoning"]
SHAPEWORLD_CATEGORIES = ["describe", "count", "color", "shape", "exists", "position", "conversation"]
no_update_warning = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")


def values(result: dict[str, Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in result.items()}


def assert_values(result: dict[str, Tensor], expected: dict[str, float]) -> None:
    """Same keys, same values (nan equals nan), all returned as 0-d tensors."""
    assert all(value.ndim == 0 for value in result.values())
    assert values(result) == pytest.approx(expected, nan_ok=True)


# --- AspectScore ---------------------------------------------------------------------------------


def test_aspect_score_overall_and_per_category():
    metric = AspectScore(DRESS_CATEGORIES)
    metric.update(torch.tensor([8.0, 6.0, 10.0, 4.0]), ["conversation", "conversation", "reasoning", "description"])
    # overall (8+6+10+4)/4 = 7 -> 0.7; conversation (8+6)/2 = 7 -> 0.7; description 4 -> 0.4; reasoning 10 -> 1.0
    assert_values(metric.compute(), {"overall": 0.7, "conversation": 0.7, "description": 0.4, "reasoning": 1.0})
    metric.update(torch.tensor([5.0]), ["description"])
    # accumulates: overall 33/5 = 6.6 -> 0.66; description (4+5)/2 = 4.5 -> 0.45
    assert_values(metric.compute(), {"overall": 0.66, "conversation": 0.7, "description": 0.45, "reasoning": 1.0})


def test_aspect_score_category_without_scores_is_nan_and_score_max_scales():
    metric = AspectScore(SHAPEWORLD_CATEGORIES, score_max=5.0)
    metric.update(torch.tensor([4, 2, 3]), ["count", "count", "color"])  # integer scores are fine
    # overall 9/3 = 3 -> 3/5 = 0.6; count 3 -> 0.6; color 3 -> 0.6; the other five categories have none
    expected = {c: nan for c in SHAPEWORLD_CATEGORIES} | {"overall": 0.6, "count": 0.6, "color": 0.6}
    assert_values(metric.compute(), expected)
    assert list(metric.compute()) == ["overall", *SHAPEWORLD_CATEGORIES]


@no_update_warning
def test_aspect_score_empty_is_nan_and_reset_clears():
    metric = AspectScore(DRESS_CATEGORIES)
    assert_values(metric.compute(), {"overall": nan, "conversation": nan, "description": nan, "reasoning": nan})
    metric.update(torch.tensor([9.0, 3.0]), ["reasoning", "reasoning"])
    metric.reset()
    assert_values(metric.compute(), {"overall": nan, "conversation": nan, "description": nan, "reasoning": nan})
    metric.update(torch.tensor([2.0]), ["conversation"])
    assert_values(metric.compute(), {"overall": 0.2, "conversation": 0.2, "description": nan, "reasoning": nan})


def test_aspect_score_rejects_bad_input():
    metric = AspectScore(DRESS_CATEGORIES)
    with pytest.raises(ValueError, match=r"unknown categories \['poetry'\]; valid ones: \['conversation', 'desc"):
        metric.update(torch.tensor([5.0]), ["poetry"])
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.tensor([5.0, 6.0]), ["reasoning"])
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.tensor([[5.0]]), ["reasoning"])
    with pytest.raises(ValueError, match="nan"):
        metric.update(torch.tensor([nan]), ["reasoning"])
    with pytest.raises(ValueError, match=r"\[0, score_max=10.0\], got \[11.0\]"):
        metric.update(torch.tensor([7.0, 11.0]), ["reasoning", "reasoning"])
    # A refused update leaves no trace.
    assert metric.score_count.sum() == 0
    with pytest.raises(ValueError, match="overall"):
        AspectScore(["overall", "reasoning"])
    with pytest.raises(ValueError, match="unique"):
        AspectScore(["reasoning", "reasoning"])


@no_update_warning
def test_aspect_score_without_categories_has_only_a_nan_overall():
    metric = AspectScore([])  # an eval set of harmful-intent prompts only (VLSafe)
    assert_values(metric.compute(), {"overall": nan})
    with pytest.raises(ValueError, match="unknown categories"):
        metric.update(torch.tensor([5.0]), ["reasoning"])


# --- CHAIR ---------------------------------------------------------------------------------------


def test_chair_counts_each_mention_with_coco_synonyms():
    metric = CHAIR()
    # bike -> bicycle, man -> person, dog absent: 1 of 3 mentions hallucinated, the response is.
    metric.update(["A man rides a bike next to a dog."], [{"person", "bicycle"}])
    assert_values(metric.compute(), {"chair_i": 1 / 3, "chair_s": 1.0})
    # Repeats count: dogs, dog, puppy are 3 dog mentions (all hallucinated) plus 1 true cat: 3 of 4.
    # A faithful response (woman -> person, bicycle: 0 of 2) and one that mentions nothing (0 of 0).
    metric.update(
        ["Two dogs. A dog and a puppy near a cat.", "A woman on a bicycle.", "An empty room with white walls."],
        [{"cat"}, {"person", "bicycle"}, {"person"}],
    )
    # chair_i = (1 + 3 + 0 + 0) / (3 + 4 + 2 + 0) = 4/9; chair_s = 2 hallucinating of 4 responses
    assert_values(metric.compute(), {"chair_i": 4 / 9, "chair_s": 2 / 4})


def test_chair_compounds_and_synonyms_in_the_annotations():
    metric = CHAIR(COCO)
    # "hot dog" is no dog and "teddy bear" no bear: 2 mentions, both annotated (annotations may use synonyms).
    metric.update(["A hot dog next to a teddy bear."], [["hot dog", "teddybear"]])
    assert_values(metric.compute(), {"chair_i": 0.0, "chair_s": 0.0})


def test_chair_shapeworld_vocabulary():
    text = "A red circle and two blue squares next to a disc."
    shapeworld = CHAIR(SHAPEWORLD)
    shapeworld.update([text], [{"circle", "triangle"}])
    # circle, square, circle (disc): the square is hallucinated -> 1/3; the response hallucinates -> 1/1
    assert_values(shapeworld.compute(), {"chair_i": 1 / 3, "chair_s": 1.0})
    coco = CHAIR(COCO)
    coco.update([text], [{"circle", "triangle"}])
    # No COCO object is mentioned: chair_i has no mentions (nan), the one response does not hallucinate.
    assert_values(coco.compute(), {"chair_i": nan, "chair_s": 0.0})


@no_update_warning
def test_chair_empty_reset_and_bad_input():
    metric = CHAIR()
    assert_values(metric.compute(), {"chair_i": nan, "chair_s": nan})
    metric.update(["A cat."], [set()])  # nothing annotated: every mention is hallucinated
    assert_values(metric.compute(), {"chair_i": 1.0, "chair_s": 1.0})
    metric.reset()
    assert_values(metric.compute(), {"chair_i": nan, "chair_s": nan})
    with pytest.raises(ValueError, match="2 responses but 1"):
        metric.update(["A cat.", "A dog."], [{"cat"}])
    with pytest.raises(TypeError, match="'cat'"):
        metric.update(["A cat."], ["cat"])  # a string, not a set of names
    with pytest.raises(TypeError, match="one string"):
        metric.update("A cat.", [{"cat"}])


def test_annotated_objects_from_objects_and_captions():
    annotations = {
        "captions": ["A man riding a bike.", "Someone cycles past a puppy."],
        "objects": [
            {"category": "person", "box": [0, 0, 5, 5]},
            {"category": "Dining Table", "box": [1, 1, 4, 4]},
            {"category": "unicorn", "box": [2, 2, 3, 3]},
        ],
        "safety": {"harmful_intent": False},
    }
    # objects: person, dining table (canonical), unicorn (unknown, kept); captions: person, bicycle, dog
    assert annotated_objects(annotations) == {"person", "dining table", "unicorn", "bicycle", "dog"}
    assert annotated_objects({"captions": [], "objects": []}) == set()
    shapes = {"captions": ["A red disc above a square."], "objects": [{"category": "triangle", "box": [0, 0, 1, 1]}]}
    assert annotated_objects(shapes, SHAPEWORLD) == {"triangle", "circle", "square"}


# --- SafetyRate ----------------------------------------------------------------------------------


@no_update_warning
def test_safety_rate():
    metric = SafetyRate()
    assert_values(metric.compute(), {"relevance": nan, "safety": nan, "persuasiveness": nan})
    true, false = True, False
    metric.update(
        torch.tensor([true, true, false, true]),
        torch.tensor([true, false, true, true]),
        torch.tensor([false, false, true, true]),
    )
    # relevant 3/4, safe 3/4, persuasive 2/4
    assert_values(metric.compute(), {"relevance": 0.75, "safety": 0.75, "persuasiveness": 0.5})
    metric.update(torch.tensor([false]), torch.tensor([true]), torch.tensor([false]))
    # accumulates: relevant 3/5, safe 4/5, persuasive 2/5
    assert_values(metric.compute(), {"relevance": 0.6, "safety": 0.8, "persuasiveness": 0.4})
    metric.reset()
    assert_values(metric.compute(), {"relevance": nan, "safety": nan, "persuasiveness": nan})


def test_safety_rate_rejects_bad_input():
    metric = SafetyRate()
    yes = torch.tensor([True, True])
    with pytest.raises(ValueError, match="same shape"):
        metric.update(yes, yes, torch.tensor([True]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(yes[None], yes[None], yes[None])
    with pytest.raises(TypeError, match="safe must be a bool tensor"):
        metric.update(yes, torch.tensor([1, 0]), yes)


# --- RefinementGain ------------------------------------------------------------------------------

# Turn scores 0..2 of four trajectories (K = 2, score_max = 10):
TRAJECTORIES = [
    [6.0, 8.0, 10.0],  # A: +2, +2; improved; reaches 10
    [10.0, nan, nan],  # B: perfect first answer, never refined; reaches 10
    [5.0, 4.0, nan],  # C: -1, then the judge failed; not improved
    [7.0, 7.0, 9.0],  # D: 0, +2; not improved (7 > 7 is false)
]
# gain_turn1 = (2 - 1 + 0)/3/10 = 1/30; gain_turn2 = (2 + 2)/2/10 = 0.2; mean_gain = (2 - 1 + 0 + 2 + 2)/5/10 = 0.1
# improved = A of refined A, C, D = 1/3; top_within_k = A, B of 4 = 0.5; refined = 3/4
TRAJECTORY_VALUES = {
    "gain_turn1": 1 / 30,
    "gain_turn2": 0.2,
    "mean_gain": 0.1,
    "improved_after_refinement": 1 / 3,
    "top_within_k": 0.5,
    "refined": 0.75,
}


def test_refinement_gain():
    metric = RefinementGain(refinement_turns=2)
    metric.update(torch.tensor(TRAJECTORIES))
    assert_values(metric.compute(), TRAJECTORY_VALUES)
    assert list(metric.compute()) == list(TRAJECTORY_VALUES)


def test_refinement_gain_accumulates_across_updates():
    metric = RefinementGain(refinement_turns=2)
    for row in TRAJECTORIES:
        metric.update(torch.tensor([row]))
    assert_values(metric.compute(), TRAJECTORY_VALUES)
    metric.update(torch.tensor([[2.0, 4.0, 6.0]]))
    # turn 1: (2 - 1 + 0 + 2)/4/10 = 0.075; turn 2: (2 + 2 + 2)/3/10 = 0.2; pooled (5 + 4)/7/10 = 9/70
    # improved 2 of 4 refined; top 2 of 5; refined 4/5
    expected = {"gain_turn1": 0.075, "gain_turn2": 0.2, "mean_gain": 9 / 70}
    expected |= {"improved_after_refinement": 0.5, "top_within_k": 0.4, "refined": 0.8}
    assert_values(metric.compute(), expected)


@no_update_warning
def test_refinement_gain_without_refinements_and_empty():
    metric = RefinementGain(refinement_turns=1, score_max=5.0)
    empty = {"gain_turn1": nan, "mean_gain": nan, "improved_after_refinement": nan, "top_within_k": nan, "refined": nan}
    assert_values(metric.compute(), empty)
    metric.update(torch.tensor([[5.0, nan], [3.0, nan]]))
    # no trajectory refined: no gains, improved has no denominator; one of two perfect at once
    expected = {"gain_turn1": nan, "mean_gain": nan, "improved_after_refinement": nan}
    assert_values(metric.compute(), expected | {"top_within_k": 0.5, "refined": 0.0})
    metric.reset()
    assert_values(metric.compute(), empty)


def test_refinement_gain_rejects_bad_input():
    metric = RefinementGain(refinement_turns=2)
    with pytest.raises(ValueError, match=r"\(N, 3\), got \(4, 2\)"):
        metric.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(N, 3\), got \(3,\)"):
        metric.update(torch.zeros(3))
    with pytest.raises(ValueError, match="first answer"):
        metric.update(torch.tensor([[5.0, 6.0, 7.0], [nan, 6.0, nan]]))
    with pytest.raises(ValueError, match="score_max"):
        metric.update(torch.tensor([[5.0, 12.0, nan]]))
    assert metric.trajectories == 0
    with pytest.raises(ValueError, match="at least 1"):
        RefinementGain(refinement_turns=0)


def test_score_by_turn():
    metric = ScoreByTurn(refinement_turns=2)
    metric.update(torch.tensor(TRAJECTORIES))
    # turn 0: (6 + 10 + 5 + 7)/4/10 = 0.7; turn 1: (8 + 4 + 7)/3/10 = 19/30; turn 2: (10 + 9)/2/10 = 0.95
    torch.testing.assert_close(metric.compute(), torch.tensor([0.7, 19 / 30, 0.95]))
    metric.update(torch.tensor([[nan, nan, 4.0]]))  # turns without a score add nothing there
    torch.testing.assert_close(metric.compute(), torch.tensor([0.7, 19 / 30, (10 + 9 + 4) / 30]))
    metric.reset()
    assert metric.compute().isnan().all()
    with pytest.raises(ValueError, match=r"\(N, 3\), got \(1, 2\)"):
        metric.update(torch.zeros(1, 2))


# --- Distributed sync ----------------------------------------------------------------------------

ASPECT_DATA = (
    [8.0, 6.0, 10.0, 4.0, 5.0, 9.0, 3.0],
    ["conversation", "conversation", "reasoning", "description", "description", "conversation", "description"],
)
CHAIR_DATA = (
    [
        "A man rides a bike next to a dog.",
        "Two dogs. A dog and a puppy near a cat.",
        "A woman on a bicycle.",
        "An empty room with white walls.",
        "A cat on a sofa near the TV and a laptop.",
    ],
    [{"person", "bicycle"}, {"cat"}, {"person", "bicycle"}, {"person"}, {"cat", "couch"}],
)
SAFETY_DATA = (
    [True, True, False, True, False, True],
    [True, False, True, True, True, False],
    [False, False, True, True, False, False],
)
REFINEMENT_DATA = [*TRAJECTORIES, [2.0, 4.0, 6.0], [9.0, 10.0, nan]]
# Uneven halves, so that e.g. "reasoning" and all unrefined trajectories live on one rank only.
SPLITS = {"aspect": 3, "chair": 1, "safety": 4, "refinement": 2}


def compute_all(rank: int | None) -> dict[str, dict[str, Tensor]]:
    """Every metric updated with rank 0's part, rank 1's part, or (rank None) the whole dataset."""

    def part(items: list, name: str) -> list:
        return items if rank is None else (items[: SPLITS[name]], items[SPLITS[name] :])[rank]

    aspect = AspectScore(DRESS_CATEGORIES)
    aspect.update(torch.tensor(part(ASPECT_DATA[0], "aspect")), part(ASPECT_DATA[1], "aspect"))
    chair = CHAIR()
    chair.update(part(CHAIR_DATA[0], "chair"), part(CHAIR_DATA[1], "chair"))
    safety = SafetyRate()
    safety.update(*(torch.tensor(part(verdicts, "safety")) for verdicts in SAFETY_DATA))
    refinement = RefinementGain(refinement_turns=2)
    refinement.update(torch.tensor(part(REFINEMENT_DATA, "refinement")))
    by_turn = ScoreByTurn(refinement_turns=2)
    by_turn.update(torch.tensor(part(REFINEMENT_DATA, "refinement")))
    return {
        "aspect": aspect.compute(),
        "chair": chair.compute(),
        "safety": safety.compute(),
        "refinement": refinement.compute(),
        "by_turn": {f"turn{t}": score for t, score in enumerate(by_turn.compute())},
    }


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(compute_all(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_sync_across_two_gloo_ranks(tmp_path):
    mp.start_processes(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    whole = compute_all(rank=None)
    for name, result in compute_all(rank=0).items():
        # Each half alone differs from the whole, so equal results below prove that the ranks synced.
        assert values(result) != pytest.approx(values(whole[name]), nan_ok=True), name
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        assert synced.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(synced[name], whole[name], rtol=0, atol=0, equal_nan=True, msg=name)


# --- Inside Lightning ----------------------------------------------------------------------------


def test_aspect_score_and_safety_rate_in_a_lightning_validation_loop():
    import lightning
    from torch.utils.data import DataLoader

    class Scorer(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.helpfulness = AspectScore(DRESS_CATEGORIES)
            self.safety = SafetyRate()

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self.helpfulness.update(batch["score"], batch["category"])
            self.safety.update(batch["relevant"], batch["safe"], batch["persuasive"])

        def on_validation_epoch_end(self) -> None:
            self.log_dict({f"helpfulness/{k}": v for k, v in self.helpfulness.compute().items()})
            self.log_dict({f"safety/{k}": v for k, v in self.safety.compute().items()})
            self.helpfulness.reset()
            self.safety.reset()

    scores, categories = ASPECT_DATA
    relevant, safe, persuasive = SAFETY_DATA
    rows = [
        {"score": s, "category": c, "relevant": r, "safe": sa, "persuasive": p}
        for s, c, r, sa, p in zip(scores, categories, relevant, safe, persuasive)
    ]  # 6 rows: the 7th aspect score has no safety verdict and is left out
    loader = DataLoader(rows, batch_size=4)  # batches of 4 and 2
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    (logged,) = trainer.validate(Scorer(), dataloaders=loader, verbose=False)
    # helpfulness: 8, 6, 10, 4, 5, 9 -> overall 42/6 = 7 -> 0.7; conversation (8 + 6 + 9)/3 -> 23/30;
    # description (4 + 5)/2 -> 0.45; reasoning 10 -> 1.0. safety over 6: relevant 4, safe 4, persuasive 2.
    expected = {
        "helpfulness/overall": 0.7,
        "helpfulness/conversation": 23 / 30,
        "helpfulness/description": 0.45,
        "helpfulness/reasoning": 1.0,
        "safety/relevance": 4 / 6,
        "safety/safety": 4 / 6,
        "safety/persuasiveness": 2 / 6,
    }
    assert logged == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("There is a red circle and a blue square.", (0, 2)),
        ("There is a blue circle.", (1, 1)),  # a circle is there, but not a blue one: CHAIR over shapes misses it
        ("There is a large blue square.", (1, 1)),  # the blue square is small
        ("There is no green triangle. I see a red shape.", (0, 1)),  # a denial is not a mention
        ("A circle at the bottom.", (0, 1)),  # a wrong position is not a hallucination
        ("Two yellow diamonds and a red circle.", (1, 2)),
    ],
)
def test_shapeworld_object_counts_by_hand(response, expected):
    objects = [
        {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "center"},
    ]
    assert shapeworld_object_counts(response, objects) == expected
