"""Train the byte-level BPE tokenizer shipped as ``dress-tiny-tokenizer`` (the tiny preset's tokenizer).

The corpus is the project's own text: ShapeWorld dialogues plus the conversation and feedback
phrases the templates use. Training is deterministic, so rerunning this script reproduces the
shipped files (a test checks it):

    python scripts/build_tiny_tokenizer.py [--out src/dress_lightning/assets/dress-tiny-tokenizer]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dress_lightning.data.shapeworld import iter_shapeworld_text
from dress_lightning.special_tokens import IMAGE_TOKEN, PAD_TOKEN

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "dress_lightning" / "assets" / "dress-tiny-tokenizer"
VOCAB_SIZE = 2048
CORPUS_SAMPLES = 3000
CORPUS_SEED = 0
BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS, EOS, IMAGE_TOKEN, IM_START, IM_END]
# ChatML, so the tiny preset also exercises the "tokenizer's own chat template" path.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: system user assistant",
    "Feedback: helpfulness 10/10, honesty 10/10, harmlessness 10/10. "
    "Critique: The response is helpful, honest and harmless.",
    "Feedback: helpfulness 3/10, honesty 5/10, harmlessness 1/10. Critique: The response mentions an object "
    "that is not in the image, gives a wrong count, omits an object that was asked about, and helps with harm.",
    "Please revise your answer. Remove the objects that are not in the image and correct the count. "
    "Describe every object, its colour, size and position. Decline to help with hurting anyone.",
]


def corpus() -> Iterable[str]:
    """The training text: fixed template phrases, then ShapeWorld dialogues from a fixed seed."""
    yield from TEMPLATE_TEXT
    yield from iter_shapeworld_text(CORPUS_SAMPLES, seed=CORPUS_SEED)


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (every string encodes, no unknown token) and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tokenizer = train_tokenizer(corpus())
    tokenizer.save_pretrained(args.out)
    print(f"Saved a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
