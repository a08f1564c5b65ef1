"""The loss computed from the labelled positions' logits only equals the full masked loss; DPO's loss by hand."""

import math

import pytest
import torch

from dress_lightning.conversation import IGNORE_INDEX
from dress_lightning.tasks import SFTTask
from dress_lightning.tasks.losses import (
    dpo_loss,
    masked_lm_loss,
    predicting_positions,
    selected_lm_loss,
    sequence_log_probs,
)


def test_selected_loss_equals_masked_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(11, (3, 7), generator=generator)
    labels[0, :4] = labels[1, :] = labels[2, 5:] = IGNORE_INDEX
    positions = predicting_positions(labels)
    torch.testing.assert_close(selected_lm_loss(logits[positions], labels, positions), masked_lm_loss(logits, labels))
    with pytest.raises(ValueError, match="no labelled token"):
        selected_lm_loss(logits[:0, 0], torch.full_like(labels, IGNORE_INDEX), positions)


def test_task_loss_from_kept_logits_equals_full_loss_and_gradients(tiny_tokenizer):
    from dress_lightning.special_tokens import IMAGE_TOKEN

    task = SFTTask()
    task.configure_model()
    model = task.model
    tiny_tokenizer.padding_side = "right"
    texts = [IMAGE_TOKEN * model.num_image_tokens + "\nHow many circles? Two.", IMAGE_TOKEN * model.num_image_tokens]
    encoded = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, IGNORE_INDEX)
    labels[:, : model.num_image_tokens + 2] = IGNORE_INDEX
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": labels,
             "pixel_values": torch.randn(2, 3, 64, 64)}
    kept = task.compute_loss(batch)
    kept.backward()
    kept_grads = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad()
    full = masked_lm_loss(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits, labels)
    full.backward()
    torch.testing.assert_close(kept, full)
    for kept_grad, p in zip(kept_grads, model.projector.parameters()):
        torch.testing.assert_close(kept_grad, p.grad)


def test_sequence_log_probs_sum_each_rows_labelled_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2:4] = torch.tensor([3, 1])  # row 0: tokens 2 and 3, predicted at positions 1 and 2
    labels[1, 4] = 6  # row 1: token 4, predicted at position 3
    log_probs = logits.log_softmax(-1)
    expected = torch.stack([log_probs[0, 1, 3] + log_probs[0, 2, 1], log_probs[1, 3, 6]])
    positions = predicting_positions(labels)
    torch.testing.assert_close(sequence_log_probs(logits, labels, positions), expected)
    torch.testing.assert_close(sequence_log_probs(logits[positions], labels, positions), expected)


def test_dpo_loss_rewards_and_accuracy_by_hand():
    out = dpo_loss(policy_chosen_logps=torch.tensor([-1.0, -2.0, -4.0]),
                   policy_rejected_logps=torch.tensor([-3.0, -1.0, -4.0]),
                   ref_chosen_logps=torch.tensor([-2.0, -2.0, -4.0]),
                   ref_rejected_logps=torch.tensor([-2.0, -2.0, -4.0]), beta=0.5)
    # rewards = 0.5 * (policy - reference): chosen (0.5, 0, 0), rejected (-0.5, 0.5, 0); margins (1, -0.5, 0)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.5, 0.0]))
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -0.5, 0.0]))
    # -log sigmoid(m) = log(1 + exp(-m))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5)) + math.log(2.0)) / 3
    assert out.loss.item() == pytest.approx(expected)  # 0.6601...
    assert out.reward_accuracy.item() == pytest.approx(1 / 3)  # a zero margin is not a win


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    reference = torch.tensor([-2.0, -2.0])
    out = dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.1)
    out.loss.backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    assert not out.margins.requires_grad and not out.reward_accuracy.requires_grad
