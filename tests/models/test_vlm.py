import pytest
import torch

from dress_lightning.models import ImageTokenMismatchError, count_parameters
from dress_lightning.special_tokens import IMAGE_TOKEN

PROMPTS = [
    "How many red circles are there?",
    "Describe the image in detail.",
    "Is there a green square?",
    "Where is the blue triangle?",
]


def _encode(tokenizer, model, texts, padding_side="left"):
    tokenizer.padding_side = padding_side
    expanded = [IMAGE_TOKEN * model.num_image_tokens + "\n" + text for text in texts]
    return tokenizer(expanded, return_tensors="pt", padding=True)


def test_image_embeddings_are_spliced_at_placeholders(tiny_model, tiny_tokenizer):
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2])
    pixel_values = torch.randn(2, 3, 64, 64)
    embeds = tiny_model.embed(batch.input_ids, pixel_values)  # (B, T, D)
    token_embeds = tiny_model.language_model.get_input_embeddings()(batch.input_ids)
    features = tiny_model.encode_images(pixel_values)  # (B, N, D)

    assert embeds.shape == token_embeds.shape
    for row in range(2):
        positions = (batch.input_ids[row] == tiny_model.image_token_id).nonzero().squeeze(1)
        assert len(positions) == tiny_model.num_image_tokens == features.shape[1]
        # Placeholders hold this row's image features in patch order; every other position is untouched.
        torch.testing.assert_close(embeds[row, positions], features[row])
        text = torch.ones(batch.input_ids.shape[1], dtype=torch.bool)
        text[positions] = False
        torch.testing.assert_close(embeds[row, text], token_embeds[row, text])


def test_forward_returns_hf_outputs_with_loss_on_labels(tiny_model, tiny_tokenizer):
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2], padding_side="right")
    labels = batch.input_ids.masked_fill(batch.input_ids == tiny_model.image_token_id, -100)
    labels = labels.masked_fill(batch.attention_mask == 0, -100)
    out = tiny_model(**batch, pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    assert out.logits.shape == (*batch.input_ids.shape, tiny_model.language_model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)

    no_labels = tiny_model(**batch, pixel_values=torch.randn(2, 3, 64, 64))
    assert no_labels.loss is None


@pytest.mark.parametrize(
    "case",
    ["truncated_placeholders", "images_without_placeholders", "placeholders_without_images", "image_count"],
)
def test_placeholder_feature_mismatch_raises(tiny_model, tiny_tokenizer, case):
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2])
    input_ids, pixel_values = batch.input_ids, torch.randn(2, 3, 64, 64)
    if case == "truncated_placeholders":
        input_ids = input_ids.clone()
        first = (input_ids[1] == tiny_model.image_token_id).nonzero()[0]
        input_ids[1, first] = tiny_tokenizer.pad_token_id
    elif case == "images_without_placeholders":
        input_ids = tiny_tokenizer(PROMPTS[:2], return_tensors="pt", padding=True).input_ids
    elif case == "placeholders_without_images":
        pixel_values = None
    else:
        pixel_values = pixel_values[:1]
    with pytest.raises(ImageTokenMismatchError, match="misaligned"):
        tiny_model(input_ids=input_ids, pixel_values=pixel_values)


def test_frozen_parameters_unchanged_after_optimizer_step(tiny_model, tiny_tokenizer):
    report = count_parameters(tiny_model)
    assert report.trainable == report.by_component["projector"][0] > 0
    assert report.by_component["vision"][0] == report.by_component["language_model"][0] == 0

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2], padding_side="right")
    labels = batch.input_ids.masked_fill(batch.input_ids == tiny_model.image_token_id, -100)
    tiny_model(**batch, pixel_values=torch.randn(2, 3, 64, 64), labels=labels).loss.backward()
    optimizer.step()

    for name, p in tiny_model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == name.startswith("projector."), name


def test_batched_greedy_equals_per_sample_greedy(tiny_model, tiny_tokenizer, scramble):
    scramble(tiny_model)
    torch.manual_seed(0)
    pixel_values = torch.randn(len(PROMPTS), 3, 64, 64)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS)
    assert (batch.attention_mask == 0).any(), "prompts of different lengths must exercise left padding"

    batched = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=12,
                                  eos_token_id=[])
    assert batched.shape == (len(PROMPTS), 12)
    assert len(set(batched.flatten().tolist())) > 4, "degenerate outputs would make the comparison vacuous"
    for i, prompt in enumerate(PROMPTS):
        single = _encode(tiny_tokenizer, tiny_model, [prompt])
        alone = tiny_model.generate(single.input_ids, single.attention_mask, pixel_values[i : i + 1],
                                    max_new_tokens=12, eos_token_id=[])
        assert alone[0].tolist() == batched[i].tolist()


def test_generation_stops_at_eos_and_pads(tiny_model, tiny_tokenizer, scramble):
    scramble(tiny_model)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2])
    pixel_values = torch.randn(2, 3, 64, 64)
    free = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=8, eos_token_id=[])
    stop_token = free[0, 2].item()  # make row 0 stop at its third token
    stopped = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=8,
                                  eos_token_id=stop_token)
    first_stop = free[0].tolist().index(stop_token)
    assert stopped[0, : first_stop + 1].tolist() == free[0, : first_stop + 1].tolist()
    assert (stopped[0, first_stop + 1 :] == tiny_model.pad_token_id).all()


def test_sampling_is_seeded_and_respects_top_p(tiny_model, tiny_tokenizer, scramble):
    scramble(tiny_model)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2])
    pixel_values = torch.randn(2, 3, 64, 64)

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                   do_sample=True, eos_token_id=[], **kwargs)

    hot = dict(temperature=2.0, top_p=1.0)
    assert torch.equal(sample(0, **hot), sample(0, **hot))
    assert not torch.equal(sample(0, **hot), sample(1, **hot))
    # A tiny nucleus keeps only the top token: sampling collapses to greedy.
    greedy = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(sample(3, temperature=1.0, top_p=1e-6), greedy)


def test_generate_refuses_right_padding(tiny_model, tiny_tokenizer):
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2], padding_side="right")
    with pytest.raises(ValueError, match="left-padded"):
        tiny_model.generate(batch.input_ids, batch.attention_mask, torch.randn(2, 3, 64, 64))


def test_generate_matches_transformers_generate_with_rows_stopping_early(tiny_model, tiny_tokenizer, scramble):
    """Finished rows leave the batch; the outputs stay those of transformers' own generate (greedy)."""
    from transformers import GenerationConfig

    scramble(tiny_model)
    torch.manual_seed(0)
    pixel_values = torch.randn(len(PROMPTS), 3, 64, 64)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS)
    free = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                               eos_token_id=[])
    stops = [free[0, 1].item(), free[2, 4].item()]  # rows stop at different steps
    ours = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                               eos_token_id=stops)
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=stops,
                              pad_token_id=tiny_model.pad_token_id)
    reference = tiny_model.language_model.generate(inputs_embeds=tiny_model.embed(batch.input_ids, pixel_values),
                                                   attention_mask=batch.attention_mask, generation_config=config)
    assert ours.tolist() == reference.tolist()
    assert (ours == tiny_model.pad_token_id).any(), "some row must have stopped early"


def test_generate_passes_the_cache_under_the_name_the_language_model_takes(tiny_model, tiny_tokenizer):
    """transformers renames ``past_key_values`` to ``cache`` (the old name warns): no warning, plain or under LoRA."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS[:2])
    pixel_values = torch.randn(2, 3, 64, 64)
    adapted = copy.deepcopy(tiny_model)
    adapted.language_model = get_peft_model(adapted.language_model,
                                            LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for model in (tiny_model, adapted):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=3)
        assert out.shape[0] == 2


def _greedy_by_hand(model, prompts, pixel_values, steps, guidance_scale):
    """Guided greedy decoding the slow way: full forwards of each prompt + the tokens so far, logits mixed."""
    chosen = []
    for _ in range(steps):
        logits = []
        for batch in prompts:
            ids = torch.cat([batch.input_ids, torch.tensor([chosen] * len(batch.input_ids), dtype=torch.long)], 1)
            mask = torch.cat([batch.attention_mask, torch.ones(len(ids), len(chosen), dtype=torch.long)], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model.language_model(inputs_embeds=model.embed(ids, pixel_values), attention_mask=mask,
                                       position_ids=positions)
            logits.append(out.logits[:, -1].float())
        conditioned, negative = logits
        chosen.append((negative + guidance_scale * (conditioned - negative)).argmax(-1).item())
    return chosen


@pytest.mark.parametrize("guidance_scale", [1.5, 3.0])
def test_guidance_decodes_the_mix_of_two_logit_vectors(tiny_model, tiny_tokenizer, guidance_scale, scramble):
    """Each token is the argmax of l_u + g (l_c - l_u) of the prompt and its negative (differing lengths)."""
    scramble(tiny_model)
    pixel_values = torch.randn(1, 3, 64, 64)
    conditioned = _encode(tiny_tokenizer, tiny_model, ["Feedback: helpfulness 10/10. Where is the blue triangle?"])
    negative = _encode(tiny_tokenizer, tiny_model, ["Where is the blue triangle?"])
    ours = tiny_model.generate(conditioned.input_ids, conditioned.attention_mask, pixel_values, max_new_tokens=6,
                               eos_token_id=[], negative_input_ids=negative.input_ids,
                               negative_attention_mask=negative.attention_mask, guidance_scale=guidance_scale)
    expected = _greedy_by_hand(tiny_model, [conditioned, negative], pixel_values, 6, guidance_scale)
    assert ours[0].tolist() == expected
    plain = tiny_model.generate(conditioned.input_ids, conditioned.attention_mask, pixel_values, max_new_tokens=6,
                                eos_token_id=[])
    assert ours[0].tolist() != plain[0].tolist(), "guidance should change this scrambled model's answer"


def test_guidance_at_one_is_plain_decoding_with_rows_stopping_early(tiny_model, tiny_tokenizer, scramble):
    scramble(tiny_model)
    torch.manual_seed(0)
    pixel_values = torch.randn(len(PROMPTS), 3, 64, 64)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS)
    negative = _encode(tiny_tokenizer, tiny_model, [p.split()[0] for p in PROMPTS])
    free = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10, eos_token_id=[])
    stops = [free[0, 1].item(), free[2, 4].item()]
    plain = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                eos_token_id=stops)
    guided = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                 eos_token_id=stops, negative_input_ids=negative.input_ids,
                                 negative_attention_mask=negative.attention_mask, guidance_scale=1.0)
    assert guided.tolist() == plain.tolist()
    assert (plain == tiny_model.pad_token_id).any(), "some row must have stopped early"


SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: ")


def test_a_prefix_shared_by_every_prompt_is_encoded_once_and_answers_do_not_change(tiny_model, tiny_tokenizer,
                                                                                    scramble):
    """A chat template's system prompt: one forward of it for the whole batch, the same greedy tokens as
    encoding it in every row, with rows stopping early and under guidance (2B rows sharing it)."""
    from dress_lightning.models.vlm import MIN_SHARED_PREFIX

    scramble(tiny_model)
    torch.manual_seed(0)
    pixel_values = torch.randn(len(PROMPTS), 3, 64, 64)
    tiny_tokenizer.padding_side = "left"
    chat = [SYSTEM + IMAGE_TOKEN * tiny_model.num_image_tokens + "\n" + text + " ASSISTANT:" for text in PROMPTS]
    batch = tiny_tokenizer(chat, return_tensors="pt", padding=True)
    negative = tiny_tokenizer([SYSTEM + IMAGE_TOKEN * tiny_model.num_image_tokens + "\n" + text.split()[0]
                               for text in PROMPTS], return_tensors="pt", padding=True)
    system_tokens = len(tiny_tokenizer(SYSTEM).input_ids)
    assert system_tokens >= MIN_SHARED_PREFIX

    calls = []  # (rows, positions) of each forward that embeds a prompt (decode steps pass input_ids)
    tiny_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2]))
        if "inputs_embeds" in kwargs else None, with_kwargs=True)

    def answers(share, **kwargs):
        calls.clear()
        return tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                   share_prefix=share, **kwargs)

    free = answers(False, eos_token_id=[])
    assert calls[0] == (len(PROMPTS), batch.input_ids.shape[1])
    stops = [free[0, 1].item(), free[2, 4].item()]  # rows stop at different steps
    shared = answers(True, eos_token_id=stops)
    assert calls[:2] == [(1, system_tokens), (len(PROMPTS), batch.input_ids.shape[1] - system_tokens)]
    assert shared.tolist() == answers(False, eos_token_id=stops).tolist()
    assert (shared == tiny_model.pad_token_id).any(), "some row must have stopped early"

    guidance = dict(eos_token_id=stops, negative_input_ids=negative.input_ids,
                    negative_attention_mask=negative.attention_mask, guidance_scale=2.0)
    guided = answers(True, **guidance)
    assert calls[0] == (1, system_tokens) and calls[1][0] == 2 * len(PROMPTS)
    assert guided.tolist() == answers(False, **guidance).tolist()
    assert guided.tolist() != shared.tolist(), "guidance should change this scrambled model's answers"


def test_a_prefix_is_only_shared_where_every_row_has_it_before_its_image(tiny_model):
    from dress_lightning.models.vlm import _shared_prefix_length

    image = tiny_model.image_token_id
    ids = torch.tensor([[0, 0, 5, 6, 7, image, 9], [5, 6, 7, 8, image, 9, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert _shared_prefix_length(ids, mask, image) == 3  # 5 6 7, then row 0 reaches its image
    right = torch.tensor([[5, 6, 7, image, 9, 0, 0], [5, 6, 7, 8, image, 9, 9]])  # training rows: right padding
    assert _shared_prefix_length(right, mask.flip(1), image) == 3
    assert _shared_prefix_length(ids[:1], mask[:1], image) == 0  # one row: nothing to share
    holes = mask.clone()
    holes[1, 1] = 0
    assert _shared_prefix_length(ids, holes, image) == 0  # not left padding: not split safely
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert _shared_prefix_length(same, torch.ones_like(same), image) == 2  # the last token stays in each row


def test_answers_per_prompt_encode_each_prompt_once(tiny_model, tiny_tokenizer, scramble):
    """``num_return_sequences``: the prompt's image and cache computed once, the answers those of the prompt
    repeated n times (greedy, rows stopping early, guided), in transformers' order; sampled ones differ."""
    scramble(tiny_model)
    torch.manual_seed(0)
    n = 3
    pixel_values = torch.randn(len(PROMPTS), 3, 64, 64)
    batch = _encode(tiny_tokenizer, tiny_model, PROMPTS)
    negative = _encode(tiny_tokenizer, tiny_model, [p.split()[0] for p in PROMPTS])
    rows = []  # rows of each forward that embeds a prompt (decode steps pass input_ids)
    tiny_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]) if "inputs_embeds" in kwargs
        else None, with_kwargs=True)

    def repeated(t):
        return t.repeat_interleave(n, dim=0)

    free = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10, eos_token_id=[])
    stops = [free[0, 1].item(), free[2, 4].item()]  # rows stop at different steps
    for guidance in ({}, dict(negative_input_ids=negative.input_ids, negative_attention_mask=negative.attention_mask,
                              guidance_scale=2.0)):
        rows.clear()
        answers = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                      eos_token_id=stops, num_return_sequences=n, **guidance)
        assert rows == [len(PROMPTS) * (2 if guidance else 1)]
        expected = tiny_model.generate(repeated(batch.input_ids), repeated(batch.attention_mask),
                                       repeated(pixel_values), max_new_tokens=10, eos_token_id=stops,
                                       **{k: repeated(v) if torch.is_tensor(v) else v for k, v in guidance.items()})
        assert answers.tolist() == expected.tolist()
        assert (answers == tiny_model.pad_token_id).any(), "some row must have stopped early"

    torch.manual_seed(1)
    sampled = tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, max_new_tokens=10,
                                  eos_token_id=[], do_sample=True, temperature=2.0, num_return_sequences=n)
    assert sampled.shape == (len(PROMPTS) * n, 10)
    assert all(len({tuple(a) for a in sampled[i * n : (i + 1) * n].tolist()}) > 1 for i in range(len(PROMPTS)))
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny_model.generate(batch.input_ids, batch.attention_mask, pixel_values, num_return_sequences=0)
