"""Conditional RL: condition rendering, turn selection, conditioning that controls a trained model, the main job."""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from dress_lightning.conditions import ConditionSettings, render_condition, target_condition
from dress_lightning.conversation import IGNORE_INDEX, ConversationFormatter
from dress_lightning.data.crl import ConditionedEncoder, TurnSelection
from dress_lightning.data.encoders import collate
from dress_lightning.data.schema import Sample
from dress_lightning.data.skips import SkipRecord
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.models.vision import describe_vision_tower
from dress_lightning.tasks import CRLTask, GenerationSettings
from dress_lightning.special_tokens import IMAGE_TOKEN

ROOT = Path(__file__).resolve().parents[2]


def _feedback(helpfulness, critique, refinement=None):
    return {"scores": {"helpfulness": helpfulness, "honesty": 10.0, "harmlessness": 10.0}, "score_max": 10.0,
            "critique": critique, "refinement": refinement, "judge": {"name": "annotation", "version": "t"}}


def _image_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(conversation, feedback=None):
    record = {"id": "s", "source": "rollout", "image_id": "s", "schema_version": 1,
              "annotations": {"captions": [], "objects": [], "safety": {"harmful_intent": False}},
              "conversation": conversation}
    if feedback is not None:
        record["feedback"] = feedback
    return Sample(record=record, image=_image_bytes(), image_ext="png")


TRAJECTORY = _sample(
    [{"role": "user", "content": f"{IMAGE_TOKEN}\nHow many circles are there?"},
     {"role": "assistant", "content": "There are three circles."},
     {"role": "user", "content": "There are two circles, not three."},
     {"role": "assistant", "content": "There are four circles."},
     {"role": "user", "content": "Count again: there are two."},
     {"role": "assistant", "content": "There are two circles."}],
    [_feedback(3.0, "Says three circles but there are two.", "There are two circles, not three."),
     _feedback(2.0, "Says four circles but there are two.", "Count again: there are two."),
     _feedback(10.0, "Correct.")],
)


@pytest.fixture(scope="module")
def formatter(tiny_tokenizer):
    return ConversationFormatter(tiny_tokenizer, num_image_tokens=64)


def _trained_responses(formatter, encoder, sample):
    encoded = encoder(sample)
    runs, current = [], []
    for token, label in zip(encoded["input_ids"].tolist(), encoded["labels"].tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(formatter.tokenizer.decode(current).strip())
            current = []
    if current:
        runs.append(formatter.tokenizer.decode(current).strip())
    return runs, formatter.tokenizer.decode(encoded["input_ids"])


def test_condition_text_per_mode():
    feedback = _feedback(7.0, "Misses the blue square.")
    assert render_condition(feedback, ConditionSettings("score_critique")) == (
        "Feedback: helpfulness 7/10, honesty 10/10, harmlessness 10/10. Critique: Misses the blue square.")
    assert render_condition(feedback, ConditionSettings("score", score_scale=5)) == (
        "Feedback: helpfulness 4/5, honesty 5/5, harmlessness 5/5.")
    assert render_condition(feedback, ConditionSettings("critique")) == "Feedback: Critique: Misses the blue square."
    assert render_condition(feedback, ConditionSettings("none")) is None
    assert target_condition(ConditionSettings()) == (
        "Feedback: helpfulness 10/10, honesty 10/10, harmlessness 10/10. Critique: The response is helpful, "
        "honest and harmless.")


@pytest.mark.parametrize(
    "turns, expected",
    [
        (TurnSelection(keep_refined="improved"), ["There are three circles.</s>", "There are two circles.</s>"]),
        (TurnSelection(keep_refined="all"),
         ["There are three circles.</s>", "There are four circles.</s>", "There are two circles.</s>"]),
        (TurnSelection(keep_refined="improved", score_threshold=0.15),
         ["There are three circles.</s>", "There are four circles.</s>", "There are two circles.</s>"]),
        (TurnSelection(refinement=False), ["There are three circles.</s>"]),
        (TurnSelection(max_turns=2, keep_refined="all"), ["There are three circles.</s>", "There are four circles.</s>"]),
    ],
    ids=["improved", "all", "threshold", "critique-only", "max-turns"],
)
def test_loss_covers_exactly_the_selected_responses(formatter, turns, expected):
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(), turns)
    trained, text = _trained_responses(formatter, encoder, TRAJECTORY)
    assert trained == expected
    # Each kept response is preceded by its own feedback, which is context, not a target.
    assert "Critique: Says three circles but there are two." in text
    assert ("Critique: Says four circles" in text) == (turns.refinement and turns.max_turns >= 2)
    assert ("There are two circles.</s>" in text) == (turns.refinement and turns.max_turns >= 3)


def test_examples_end_at_their_last_trained_token(formatter):
    """A refinement that did not improve carries no loss; it and everything after it cannot change the loss."""
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(),
                                 TurnSelection(max_turns=2, keep_refined="improved"))
    encoded = encoder(TRAJECTORY)
    trained, text = _trained_responses(formatter, encoder, TRAJECTORY)
    assert trained == ["There are three circles.</s>"]
    assert text.endswith("There are three circles.</s>") and "four circles" not in text
    assert encoded["labels"][-1] != IGNORE_INDEX and len(encoded["labels"]) == len(encoded["input_ids"])


def test_sft_samples_get_the_target_condition_on_every_turn(formatter):
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(), TurnSelection())
    sft = _sample(TRAJECTORY.record["conversation"][:2])
    trained, text = _trained_responses(formatter, encoder, sft)
    assert trained == ["There are three circles.</s>"]
    assert target_condition(ConditionSettings()) in text


def test_condition_dropout_drops_the_configured_share(formatter):
    """Dropout 0.3 over 2000 trajectories x 3 turns removes about 30% of the conditions, the same ones every time."""
    encoder = ConditionedEncoder(formatter, None, ConditionSettings(dropout=0.3), TurnSelection(keep_refined="all"))
    dropped = total = 0
    for i in range(2000):
        sample = Sample(record={**TRAJECTORY.record, "id": f"t{i}"}, image=b"", image_ext="png")
        _, conditions, _ = encoder.select(sample)
        assert conditions == encoder.select(sample)[1]  # deterministic: a resumed fit sees the same data
        dropped += sum(c is None for c in conditions)
        total += len(conditions)
    assert abs(dropped / total - 0.3) < 0.02
    keep_all = ConditionedEncoder(formatter, None, ConditionSettings(), TurnSelection(keep_refined="all"))
    assert None not in keep_all.select(TRAJECTORY)[1]
    with pytest.raises(ValueError, match="dropout"):
        ConditionSettings(dropout=1.0)


def test_refined_turns_can_be_trained_on_the_reference_answer(formatter):
    """refinement_target=reference: a kept refined turn says the annotations' answer, under the target condition."""
    from dress_lightning.data.shapeworld import generate_record

    record = next(r for r, _ in (generate_record("train", 0, i) for i in range(50)) if r["category"] == "count")
    question, reference = record["conversation"][0], record["conversation"][1]["content"]
    conversation = [question, {"role": "assistant", "content": "There are nine circles."},
                    {"role": "user", "content": "Count again."}, {"role": "assistant", "content": "Maybe eight."}]
    sample = Sample(record={**record, "conversation": conversation,
                            "feedback": [_feedback(2.0, "Wrong count.", "Count again."), _feedback(3.0, "Still wrong.")]},
                    image=_image_bytes(), image_ext="png")
    spec = describe_vision_tower("dress-tiny-vit")
    own = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(), TurnSelection(keep_refined="all"))
    assert _trained_responses(formatter, own, sample)[0] == ["There are nine circles.</s>", "Maybe eight.</s>"]
    turns = TurnSelection(keep_refined="all", refinement_target="reference")
    encoder = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(), turns)
    trained, text = _trained_responses(formatter, encoder, sample)
    assert trained == ["There are nine circles.</s>", f"{reference}</s>"]
    assert text.count(target_condition(ConditionSettings())) == 1  # the refined turn; the first keeps its feedback


def test_random_templates_vary_the_phrasing_in_training_only(formatter):
    """templates=random spreads training conditions over every phrasing; inference keeps the canonical one."""
    from dress_lightning.conditions import TEMPLATES

    settings = ConditionSettings(templates="random")
    encoder = ConditionedEncoder(formatter, None, settings, TurnSelection(keep_refined="all"))
    openings = set()
    for i in range(40):
        _, conditions, _ = encoder.select(Sample(record={**TRAJECTORY.record, "id": f"t{i}"}, image=b"", image_ext="png"))
        openings |= {next(o for o, _, _ in TEMPLATES if c.startswith(o)) for c in conditions}
    assert openings == {o for o, _, _ in TEMPLATES}
    assert target_condition(settings) == target_condition(ConditionSettings())
    assert render_condition(TRAJECTORY.record["feedback"][0], settings, template=2) == (
        "Rated helpfulness 3/10, honesty 10/10, harmlessness 10/10. Reviewer notes: Says three circles but there are two."
    )


def test_trajectory_without_trainable_turn_is_skipped(formatter):
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, ConditionSettings(), TurnSelection())
    failed = _sample(TRAJECTORY.record["conversation"][:2], [None])
    with pytest.raises(SkipRecord, match="no trainable turn"):
        encoder(failed)


def test_condition_controls_a_trained_toy_model(formatter):
    """Low-score condition -> one answer, target condition -> another: the model produces each on demand."""
    settings = ConditionSettings()
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, settings, TurnSelection())
    question = {"role": "user", "content": f"{IMAGE_TOKEN}\nHow many circles are there?"}
    good, bad = "There are two circles.", "I see many squares."
    samples = [
        _sample([question, {"role": "assistant", "content": good}]),  # SFT sample: target condition
        _sample([question, {"role": "assistant", "content": bad}], [_feedback(1.0, "Wrong.")]),
    ]
    batch = collate([encoder(s) for s in samples], formatter.tokenizer.pad_token_id)
    torch.manual_seed(0)
    task = CRLTask(model=VisionLanguageConfig(freeze_language_model=False), condition=settings)
    task.configure_model()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = task.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    task.eval()

    def answer(condition):
        prompt = torch.tensor([formatter.encode_prompt([question], condition)])
        prompts = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt),
                   "pixel_values": batch["pixel_values"][:1], "ids": ["q"], "stop_token_ids": formatter.stop_token_ids}
        return task.generate(prompts, GenerationSettings(max_new_tokens=12))[0][0]

    assert answer(task.generation_condition()) == good
    assert answer(render_condition(_feedback(1.0, "Wrong."), settings)) == bad


def test_reserved_condition_tokens_train_survive_save_and_load(judged_nlf_shards, policy_checkpoint, tmp_path):
    """encoding=tokens: CRL from an SFT checkpoint grows the vocabulary by one token per aspect and score; the
    checkpoint keeps those rows, and the loaded model conditions on the same single-token ids."""
    from dress_lightning.cli import main
    from dress_lightning.conditions import condition_tokens
    from dress_lightning.inference import load_task

    run, shards = tmp_path / "run", policy_checkpoint.parent.parent
    assert main(["fit", "-c", str(ROOT / "configs/crl.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
                 "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
                 "--trainer.callbacks.init_args.dirpath", str(run / "ck"),
                 "--model.init_args.init_checkpoint", str(policy_checkpoint),
                 "--model.init_args.condition.encoding", "tokens",
                 "--data.init_args.nlf_shards", str(judged_nlf_shards),
                 "--data.init_args.train_shards", str(shards / "train"), "--data.init_args.train_shapeworld", "null",
                 "--data.init_args.val_shards", str(shards / "val"), "--data.init_args.val_shapeworld", "null",
                 "--data.init_args.epoch_length", "32"]) == 0
    task = load_task(str(run / "ck" / "last.ckpt"))
    settings = task.condition
    tokens = condition_tokens(settings)
    assert len(tokens) == 3 * 11
    ids = task.tokenizer.convert_tokens_to_ids(tokens)
    assert len(set(ids)) == len(tokens) and task.tokenizer.unk_token_id not in ids  # each one token of its own
    embeddings = task.model.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] >= max(ids) + 1
    saved = torch.load(run / "ck" / "last.ckpt", weights_only=True)["state_dict"]
    name = next(k for k in saved if k.endswith("embed_tokens.weight"))
    assert torch.equal(saved[name], embeddings.detach())  # the added rows were trained and saved
    condition = task.generation_condition()
    assert condition.startswith("<helpfulness_10><honesty_10><harmlessness_10>")
    top = task.tokenizer.convert_tokens_to_ids(["<helpfulness_10>", "<honesty_10>", "<harmlessness_10>"])
    assert set(top) <= set(task.tokenizer(condition)["input_ids"])

    # configs/crl.yaml puts the condition before the question; the checkpoint records it, so chat (and
    # evaluate, rollout, export: conversation_settings) prompt the model as it was trained.
    from dress_lightning.session import load_model

    assert settings.placement == "user_prefix"
    assert load_model(run / "ck" / "last.ckpt").formatter.condition_placement == "user_prefix"


def test_the_condition_placement_is_the_conditions_not_a_second_data_option():
    from dress_lightning.conditions import ConditionSettings
    from dress_lightning.data.crl import CRLDataModule

    data = CRLDataModule(nlf_shards="nlf", condition=ConditionSettings(placement="user_prefix"))
    assert data.condition_placement == "user_prefix"
    with pytest.raises(ValueError, match="set model.init_args.condition.placement"):
        CRLDataModule(nlf_shards="nlf", condition=ConditionSettings(placement="user_prefix"),
                      condition_placement="assistant_prefix")


def test_token_encoding_masks_loss_on_exactly_the_responses(tiny_tokenizer):
    """With reserved condition tokens the label mask still covers the trained responses only."""
    from dress_lightning.conditions import condition_tokens

    settings = ConditionSettings(encoding="tokens")
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.add_tokens([IMAGE_TOKEN, *condition_tokens(settings)], special_tokens=True)
    formatter = ConversationFormatter(tokenizer, num_image_tokens=64)
    spec = describe_vision_tower("dress-tiny-vit")
    encoder = ConditionedEncoder(formatter, spec.image_transform, settings, TurnSelection(keep_refined="all"))
    trained, text = _trained_responses(formatter, encoder, TRAJECTORY)
    assert trained == ["There are three circles.</s>", "There are four circles.</s>", "There are two circles.</s>"]
    assert "<helpfulness_3><honesty_10><harmlessness_10>" in text.replace(" ", "")
