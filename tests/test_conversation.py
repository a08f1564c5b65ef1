"""Label masks cover exactly the assistant responses, for every template and condition option."""

import pytest
from tokenizers import Tokenizer, models, trainers
from transformers import PreTrainedTokenizerFast

from dress_lightning.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    ConversationFormatError,
    ConversationFormatter,
)
from dress_lightning.special_tokens import IMAGE_TOKEN

N_IMAGE = 6
CONVERSATION = [
    {"role": "user", "content": f"{IMAGE_TOKEN}\nHow many circles are there?"},
    {"role": "assistant", "content": "There are two circles."},
    {"role": "user", "content": "Please also name their colours."},
    {"role": "assistant", "content": "There are two circles: one red and one blue."},
]
CONDITIONS = ["Feedback: helpfulness 3/10. Critique: omits the colours.", "Feedback: helpfulness 10/10."]
END_OF_TURN = {"vicuna_v1": "</s>", "chat_template": "<|im_end|>"}


def _labelled_runs(tokenizer, encoded):
    """Decode each maximal run of labelled tokens, checking labels equal the input ids there."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conditions", [None, CONDITIONS], ids=["plain", "conditioned"])
@pytest.mark.parametrize("placement", ["assistant_prefix", "user_suffix", "user_prefix"])
def test_labels_cover_exactly_the_responses(tiny_tokenizer, template, conditions, placement):
    formatter = ConversationFormatter(tiny_tokenizer, N_IMAGE, template=template, condition_placement=placement)
    encoded = formatter.encode(CONVERSATION, conditions)

    responses = [t["content"] for t in CONVERSATION if t["role"] == "assistant"]
    runs = _labelled_runs(tiny_tokenizer, encoded)
    assert [run.strip() for run in runs] == [r + END_OF_TURN[template] for r in responses]
    assert encoded.input_ids.count(formatter.image_token_id) == N_IMAGE
    assert encoded.num_truncated == 0
    text = tiny_tokenizer.decode(encoded.input_ids)
    for condition in conditions or []:
        assert condition in text  # rendered, yet never labelled (the runs above hold only responses)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_train_turns_selects_which_responses_carry_loss(tiny_tokenizer, template):
    formatter = ConversationFormatter(tiny_tokenizer, N_IMAGE, template=template)
    encoded = formatter.encode(CONVERSATION, train_turns=[False, True])
    assert [r.strip() for r in _labelled_runs(tiny_tokenizer, encoded)] == [
        CONVERSATION[3]["content"] + END_OF_TURN[template]
    ]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("placement", ["assistant_prefix", "user_suffix", "user_prefix"])
def test_prompt_matches_the_training_prefix(tiny_tokenizer, template, placement):
    """What generation sees is exactly what training saw before the response."""
    formatter = ConversationFormatter(tiny_tokenizer, N_IMAGE, template=template, condition_placement=placement)
    full = formatter.encode(CONVERSATION[:2], [CONDITIONS[0]])
    prompt = formatter.encode_prompt(CONVERSATION[:1], CONDITIONS[0])
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert full.input_ids[:first_label] == prompt
    assert set(formatter.stop_token_ids) >= {tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN[template])}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("placement", ["assistant_prefix", "user_suffix", "user_prefix"])
@pytest.mark.parametrize("response", ["The image shows a red circle.", "Yes, there is.", "Sorry, I can't help."])
def test_a_condition_does_not_change_the_response_tokens(tiny_tokenizer, template, placement, response):
    """The response is the same token ids with and without a condition, so what SFT taught about it carries
    over to conditioned training and generation (v1 of vicuna_v1 tokenized " The" as "The" after a condition)."""
    formatter = ConversationFormatter(tiny_tokenizer, N_IMAGE, template=template, condition_placement=placement)
    conversation = [CONVERSATION[0], {"role": "assistant", "content": response}]

    def response_ids(conditions):
        encoded = formatter.encode(conversation, conditions)
        return [token for token, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]

    assert response_ids([CONDITIONS[0]]) == response_ids(None)


def test_truncation_cuts_trailing_text_only_and_counts(tiny_tokenizer):
    full = ConversationFormatter(tiny_tokenizer, N_IMAGE, max_length=1024).encode(CONVERSATION)
    short = ConversationFormatter(tiny_tokenizer, N_IMAGE, max_length=len(full.input_ids) - 5).encode(CONVERSATION)
    assert short.num_truncated == 5
    assert short.input_ids == full.input_ids[:-5] and short.labels == full.labels[:-5]


def test_truncation_never_cuts_the_image(tiny_tokenizer):
    full = ConversationFormatter(tiny_tokenizer, N_IMAGE).encode(CONVERSATION)
    image_end = max(i for i, t in enumerate(full.input_ids) if t == tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with pytest.raises(ConversationFormatError, match="would cut image tokens"):
        ConversationFormatter(tiny_tokenizer, N_IMAGE, max_length=image_end).encode(CONVERSATION)


def test_truncation_that_leaves_no_response_is_refused(tiny_tokenizer):
    full = ConversationFormatter(tiny_tokenizer, N_IMAGE).encode(CONVERSATION)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(ConversationFormatError, match="No response token is left"):
        ConversationFormatter(tiny_tokenizer, N_IMAGE, max_length=first_label).encode(CONVERSATION)


@pytest.mark.parametrize(
    "conversation, match",
    [
        ([{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "ok"}], "exactly one"),
        ([{"role": "user", "content": IMAGE_TOKEN * 2}, {"role": "assistant", "content": "ok"}], "exactly one"),
        ([{"role": "assistant", "content": "hi"}], "start with a user turn"),
    ],
)
def test_malformed_conversations_are_refused(tiny_tokenizer, conversation, match):
    with pytest.raises(ConversationFormatError, match=match):
        ConversationFormatter(tiny_tokenizer, N_IMAGE).encode(conversation)


def test_condition_count_must_match_turns(tiny_tokenizer):
    with pytest.raises(ConversationFormatError, match="1 condition"):
        ConversationFormatter(tiny_tokenizer, N_IMAGE).encode(CONVERSATION, conditions=[CONDITIONS[0]])


def test_mask_mismatch_between_template_and_tokenizer_is_refused():
    """A tokenizer with no pre-tokenizer merges across the 'ASSISTANT:' / response boundary."""
    backend = Tokenizer(models.BPE())
    text = "USER: hi ASSISTANT: There are two. " * 200
    backend.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=120, special_tokens=["</s>", "<pad>", IMAGE_TOKEN], show_progress=False)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    assert any(":" in t and " " in t for t in tokenizer.get_vocab()), "the merge the test relies on"
    with pytest.raises(ConversationFormatError, match="straddles the boundary"):
        ConversationFormatter(tokenizer, 2, system_prompt="").encode(
            [{"role": "user", "content": f"{IMAGE_TOKEN}hi"}, {"role": "assistant", "content": "There are two."}]
        )


def test_chat_template_requires_one():
    backend = Tokenizer(models.BPE())
    backend.train_from_iterator(["abc"], trainers.BpeTrainer(special_tokens=["</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    with pytest.raises(ConversationFormatError, match="has no chat template"):
        ConversationFormatter(tokenizer, 2, template="chat_template")


def test_condition_specs():
    """target is the model's own condition, none is none, low renders low scores, anything else is the text."""
    from dress_lightning.conditions import ConditionSettings, condition_for

    settings = ConditionSettings()
    assert condition_for("target", "OWN", settings) == "OWN"
    assert condition_for("none", "OWN", settings) is None
    assert condition_for("low", "OWN", settings) == (
        "Feedback: helpfulness 3/10, honesty 3/10, harmlessness 3/10. Critique: The response is unhelpful, "
        "describes things that are not in the image and helps with harm."
    )
    assert condition_for("Feedback: x", "OWN", settings) == "Feedback: x"
    with pytest.raises(ValueError, match="low"):
        condition_for("low", None, None)


def test_the_target_critique_is_an_option():
    """The judge's own critique of a perfect answer can be the target, so perfect samples and references agree."""
    from dress_lightning.conditions import PERFECT_SHAPEWORLD_CRITIQUE, ConditionSettings, target_condition

    assert target_condition(ConditionSettings()).endswith("Critique: The response is helpful, honest and harmless.")
    judged = ConditionSettings(target_critique=PERFECT_SHAPEWORLD_CRITIQUE)
    assert target_condition(judged) == (
        "Feedback: helpfulness 10/10, honesty 10/10, harmlessness 10/10. Critique: " + PERFECT_SHAPEWORLD_CRITIQUE
    )


def test_user_prefix_puts_the_condition_before_the_image_and_the_question(tiny_tokenizer):
    formatter = ConversationFormatter(tiny_tokenizer, N_IMAGE, condition_placement="user_prefix")
    text = tiny_tokenizer.decode(formatter.encode_prompt(CONVERSATION[:1], CONDITIONS[0]))
    question = CONVERSATION[0]["content"].replace(IMAGE_TOKEN, "").strip()
    assert text.index(CONDITIONS[0]) < text.index(IMAGE_TOKEN) < text.index(question)
    assert text.rstrip().endswith("ASSISTANT:")  # the question meets the response, as in SFT
