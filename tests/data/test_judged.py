"""Selections from judged NLF trajectories: rejection sampling's kept responses, DPO's preference pairs, their encoders
and the derived shards a DataModule writes."""

import io
import json

import pytest
import torch
from PIL import Image

from dress_lightning.conversation import IGNORE_INDEX, ConversationFormatter
from dress_lightning.data.dpo import DPODataModule, PairEncoder, PairSelection, preference_pairs
from dress_lightning.data.judged import group_by_prompt
from dress_lightning.data.rft import LastResponseEncoder, ResponseSelection, select_responses
from dress_lightning.data.schema import Sample, build_record
from dress_lightning.data.shards import SkipLog, iter_samples
from dress_lightning.feedback.rollout import trajectory_id
from dress_lightning.models.vision import describe_vision_tower
from dress_lightning.special_tokens import IMAGE_TOKEN

QUESTION = {"role": "user", "content": f"{IMAGE_TOKEN}\nHow many circles are there?"}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _feedback(score):
    """Helpfulness only, so that the mean score fraction is score / 10 exactly as written."""
    if score is None:
        return None
    return {"scores": {"helpfulness": score}, "score_max": 10.0, "critique": "c", "refinement": None,
            "judge": {"name": "test", "version": "1"}}


def _trajectory(prompt: str, index: int, responses: list[str], scores: list[float | None]) -> Sample:
    """A rollout trajectory: ``responses`` in turn (each later one answers "Look again."), one score /10 each."""
    conversation = [QUESTION]
    for k, text in enumerate(responses):
        conversation += [{"role": "user", "content": "Look again."}] if k else []
        conversation.append({"role": "assistant", "content": text})
    record = build_record(sample_id=trajectory_id(prompt, index), source="rollout", image_id=prompt,
                          conversation=conversation, feedback=[_feedback(s) for s in scores],
                          provenance={"prompt_id": prompt, "sample_index": index})
    return Sample(record=record, image=_png(), image_ext="png")


# Mean score fractions in brackets; None: the judge failed.
SCORED = group_by_prompt([
    _trajectory("a", 0, ["A", "A2"], [9, 9]),      # A (0.9), refined A2 (0.9)
    _trajectory("a", 1, ["B"], [5]),               # B (0.5)
    _trajectory("a", 2, ["C"], [5]),               # C (0.5): ties with B
    _trajectory("a", 3, ["D"], [None]),            # failed
    _trajectory("b", 0, ["E", "F", "G"], [3, 7, 6]),  # E (0.3) -> F (0.7) -> G (0.6): 0.7 - 0.6 is 0.0999... in floats
    _trajectory("b", 1, ["H"], [None]),            # failed: b has one judged first response
    _trajectory("c", 0, ["I", "J"], [4, None]),    # I (0.4), its refinement's judgement failed
    _trajectory("d", 0, ["Same"], [8]),
    _trajectory("d", 1, ["Same "], [2]),           # the same text scored apart (a noisy judge)
])


def _texts(samples):
    return [s.record["conversation"][-1]["content"] for s in samples]


def test_trajectories_group_by_the_rollouts_prompt_id():
    assert list(SCORED) == ["a", "b", "c", "d"]
    assert [t.record["id"] for t in SCORED["a"]] == ["a-r0", "a-r1", "a-r2", "a-r3"]
    alone = _trajectory("x", 0, ["A"], [5])
    del alone.record["provenance"]
    assert list(group_by_prompt([alone])) == ["x-r0"]  # no prompt id (converted LVLM_NLF): a group of its own


@pytest.mark.parametrize(
    "selection, kept, skipped",
    [
        (ResponseSelection(top_k=1), ["A", "E", "I", "Same"], {"beyond top_k": 3, "failed judgement": 2}),
        (ResponseSelection(top_k=1, turns="all"), ["A", "F", "I", "Same"],  # A ties A2: the earlier turn wins
         {"beyond top_k": 6, "failed judgement": 3}),
        (ResponseSelection(top_k=None, min_score=0.5, turns="all"), ["A", "A2", "B", "C", "F", "G", "Same"],
         {"below min_score": 3, "failed judgement": 3}),
        (ResponseSelection(top_k=1, min_score=0.5), ["A", "Same"],
         {"below min_score": 3, "beyond top_k": 2, "failed judgement": 2}),
    ],
    ids=["best-of-n", "best-of-all-turns", "threshold", "both"],
)
def test_rejection_sampling_keeps_the_best_responses_per_prompt(selection, kept, skipped):
    samples, report = select_responses(SCORED, selection)
    assert _texts(samples) == kept
    assert dict(report.skipped) == skipped
    assert sum(report.kept.values()) == len(kept)


def test_a_kept_refined_response_keeps_its_dialogue_and_origin():
    samples, report = select_responses(SCORED, ResponseSelection(top_k=1, turns="all"))
    refined = samples[1]
    assert [t["content"] for t in refined.record["conversation"]] == [QUESTION["content"], "E", "Look again.", "F"]
    assert refined.record["selected"] == {"id": "b-r0", "turn": 1, "score": 0.7}
    assert "feedback" not in refined.record
    assert report.kept == {"first response": 3, "refined response": 1}


def test_selection_needs_top_k_or_min_score():
    with pytest.raises(ValueError, match="set top_k"):
        ResponseSelection(top_k=None, min_score=None)


def test_pair_builder_skips_and_counts_ties_single_responses_and_failed_judgements():
    pairs, report = preference_pairs(SCORED, PairSelection(margin=0.1))
    chosen_over_rejected = [(s.record["conversation"][-1]["content"], s.record["preference"]["rejected"]["content"],
                             s.record["preference"]["kind"]) for s in pairs]
    assert chosen_over_rejected == [
        ("A", "B", "samples"), ("A", "C", "samples"),  # B vs C and A vs A2 are ties
        ("F", "E", "refinement"), ("F", "G", "refinement"),  # 0.7 - 0.6 meets a margin of 0.1
    ]
    assert report.kept == {"samples": 2, "refinement": 2}
    assert dict(report.skipped) == {"tie": 2, "failed judgement": 3, "single response": 2, "identical responses": 1}
    # Both answers answer the first question: a refined answer loses its dialogue.
    assert pairs[2].record["conversation"] == [QUESTION, {"role": "assistant", "content": "F"}]
    assert pairs[2].record["preference"]["chosen"] == {"id": "b-r0", "turn": 1, "score": 0.7}


def test_pair_options_margin_and_refinement_pairs():
    pairs, report = preference_pairs(SCORED, PairSelection(margin=0.2))
    assert [p.record["preference"]["kind"] for p in pairs] == ["samples", "samples", "refinement"]
    assert report.skipped["tie"] == 3
    pairs, report = preference_pairs(SCORED, PairSelection(refinement_pairs=False))
    assert report.kept == {"samples": 2}
    with pytest.raises(ValueError, match="margin"):
        PairSelection(margin=0.0)


@pytest.fixture(scope="module")
def formatter(tiny_tokenizer):
    return ConversationFormatter(tiny_tokenizer, num_image_tokens=describe_vision_tower("dress-tiny-vit").num_patches)


def _labelled_text(formatter, input_ids, labels):
    labelled = [token for token, label in zip(input_ids.tolist(), labels.tolist()) if label != IGNORE_INDEX]
    return formatter.tokenizer.decode(labelled)


def test_last_response_encoder_trains_on_the_kept_response_only(formatter):
    encoder = LastResponseEncoder(formatter, describe_vision_tower("dress-tiny-vit").image_transform)
    samples, _ = select_responses(SCORED, ResponseSelection(top_k=1, turns="all"))
    example = encoder(samples[1])  # E, "Look again.", F: only F carries loss
    assert _labelled_text(formatter, example["input_ids"], example["labels"]).strip() == "F</s>"


def test_pair_batch_holds_chosen_rows_then_rejected_rows_of_the_same_prompt(formatter):
    encoder = PairEncoder(formatter, describe_vision_tower("dress-tiny-vit").image_transform)
    pairs, _ = preference_pairs(SCORED, PairSelection())
    batch = encoder.collate([encoder(pairs[0]), encoder(pairs[2])])
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == batch["pixel_values"].shape[0] == 4
    assert batch["ids"] == [pairs[0].record["id"], pairs[2].record["id"]] * 2
    answers = [_labelled_text(formatter, ids, labels).strip()
               for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert answers == ["A</s>", "F</s>", "B</s>", "E</s>"]
    for chosen, rejected in ((0, 2), (1, 3)):  # the same prompt tokens up to the answer
        start = int((batch["labels"][chosen] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(batch["input_ids"][chosen, :start], batch["input_ids"][rejected, :start])
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])


def test_prepare_data_writes_the_pairs_and_counts(judged_nlf_shards, tmp_path):
    datamodule = DPODataModule(nlf_shards=str(judged_nlf_shards), derived_dir=str(tmp_path / "pairs"), batch_size=5,
                               num_workers=0, epoch_length=8)
    datamodule.prepare_data()
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    # 6 prompts: right (1.0) vs wrong (0.47) first answers, plus 6/10 (0.73) on odd prompts (failed on even ones);
    # every wrong answer's refinement is right.
    assert summary["kept"] == {"samples": 3 * 1 + 3 * 3, "refinement": 6}
    assert summary["skipped"] == {"failed judgement": 3}
    assert len(list(iter_samples([str(p) for p in (tmp_path / "pairs").glob("*.tar")], SkipLog()))) == 18
    batches = list(datamodule.pair_batches())
    assert [len(b["ids"]) // 2 for b in batches] == [5, 5, 5, 3]
    train = next(iter(datamodule.train_dataloader()))
    assert train["input_ids"].shape[0] == 2 * 5 and train["ids"][:5] == train["ids"][5:]


def test_nlf_shards_without_trajectories_or_pairs_are_clear_errors(judged_nlf_shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nlf_shards=.*holds no trajectory with feedback"):
        DPODataModule(nlf_shards=str(empty), derived_dir=str(tmp_path / "d")).prepare_data()
    no_pairs = DPODataModule(nlf_shards=str(judged_nlf_shards), derived_dir=str(tmp_path / "d"),
                             pairs=PairSelection(margin=1.0))
    with pytest.raises(ValueError, match="derived no training sample .* tie"):
        no_pairs.prepare_data()
