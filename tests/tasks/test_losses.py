"""The loss computed from the labelled positions' logits only equals the full masked loss."""

import pytest
import torch

from dress_lightning.conversation import IGNORE_INDEX
from dress_lightning.tasks import SFTTask
from dress_lightning.tasks.losses import masked_lm_loss, predicting_positions, selected_lm_loss


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
