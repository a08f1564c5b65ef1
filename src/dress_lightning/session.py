"""A conversation with a trained model about one image: what ``chat`` and ``demo`` are built on.

The user asks; the model answers under a condition (by default the model's own: the target
``C(f*)`` for conditional RL); anything the user says next, feedback included, is the next user
turn, the way refinement NLF is given back in training. A judge, when there is one, critiques each
answer and writes a refinement the user may send back as the next turn.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from transformers import TextStreamer

from dress_lightning.conditions import TARGET, condition_for
from dress_lightning.data.schema import Turn, ensure_image_token
from dress_lightning.data.shapeworld import is_shapeworld
from dress_lightning.decoding import Decoding
from dress_lightning.feedback.judges import Critique, Judge, JudgeFailure
from dress_lightning.pretrained import PretrainedVisionLanguageModel, from_pretrained


def load_model(path: str | Path) -> PretrainedVisionLanguageModel:
    """A model to talk to, from an exported folder (no Lightning) or a Lightning checkpoint."""
    if Path(path).is_dir():
        return from_pretrained(path)
    from dress_lightning.conversation import ConversationFormatter
    from dress_lightning.inference import load_task
    from dress_lightning.pretrained import conversation_settings

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a Lightning checkpoint or an exported folder.")
    task = load_task(str(path))
    condition = getattr(task, "condition", None)
    return PretrainedVisionLanguageModel(
        model=task.model,
        formatter=ConversationFormatter(task.tokenizer, task.model.num_image_tokens, **conversation_settings(condition)),
        condition=condition,
        config={},
    )


@dataclass(frozen=True)
class Judgement:
    """The judge's critique NLF of an answer and the refinement it suggests (None: none was needed)."""

    critique: Critique
    refinement: str

    def describe_scores(self) -> str:
        """``helpfulness 7/10, honesty 3/10, harmlessness 10/10``."""
        return ", ".join(f"{aspect} {score:g}/10" for aspect, score in self.critique.scores.items())


@dataclass
class ChatSession:
    """One image, the turns so far, the condition of the next answer, and an optional judge."""

    vlm: PretrainedVisionLanguageModel
    judge: Judge | None = None
    decoding: Decoding = field(default_factory=Decoding)
    conversation: list[Turn] = field(default_factory=list)
    condition_spec: str = TARGET
    """``target``, ``none``, ``low`` or the condition text itself (e.g. ``Feedback: helpfulness 3/10, ...``)."""
    annotations: dict[str, Any] | None = None
    pixel_values: torch.Tensor | None = None
    example_question: str | None = None
    """The question a ShapeWorld example was generated with (its annotations describe that question)."""

    @property
    def condition(self) -> str | None:
        """The condition text of the next answer."""
        return condition_for(self.condition_spec, self.vlm.generation_condition(), self.vlm.condition)

    def set_image(self, image: Image.Image, annotations: Mapping[str, Any] | None = None,
                  example_question: str | None = None) -> None:
        """Start a new conversation about ``image`` (with its annotations, if it has any)."""
        self.pixel_values = self.vlm.image_transform(image.convert("RGB"))
        self.annotations = None if annotations is None else dict(annotations)
        self.example_question = example_question
        self.conversation = []

    def reset(self) -> None:
        """Forget the turns so far; keep the image, condition and judge."""
        self.conversation = []

    def ask(self, text: str, streamer=None) -> str:
        """Send ``text`` as the next user turn (a question or feedback) and return the model's answer."""
        if self.pixel_values is None:
            raise ValueError("No image yet: call set_image() (chat: --image PATH or --shapeworld INDEX) first.")
        text = text.strip()
        if not text:
            raise ValueError("Empty message: type a question or feedback.")
        if self.decoding.guidance_scale != 1.0 and self.negative_condition == self.condition:
            raise ValueError(
                f"guidance {self.decoding.guidance_scale:g} mixes two passes under the same condition "
                f"({self.condition!r}), which changes nothing; set another negative condition, or guidance 1"
            )
        self.conversation.append(Turn(role="user", content=text if self.conversation else ensure_image_token(text)))
        formatter = self.vlm.formatter
        prompt = torch.tensor([formatter.encode_prompt(self.conversation, self.condition)])
        tokens = self.vlm.model.generate(
            prompt,
            torch.ones_like(prompt),
            self.pixel_values[None],
            max_new_tokens=self.decoding.max_new_tokens,
            do_sample=self.decoding.temperature > 0,
            temperature=self.decoding.temperature or 1.0,
            top_p=self.decoding.top_p,
            eos_token_id=formatter.stop_token_ids,
            streamer=streamer,
            **self._guidance(),
        )  # (1, T_new)
        answer = formatter.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
        self.conversation.append(Turn(role="assistant", content=answer))
        return answer

    @property
    def negative_condition(self) -> str | None:
        """The condition classifier-free guidance steers away from (``decoding.negative_condition``)."""
        return condition_for(self.decoding.negative_condition, self.vlm.generation_condition(), self.vlm.condition)

    def _guidance(self) -> dict[str, Any]:
        """``generate``'s guidance arguments: the conversation again under the negative condition (none at 1)."""
        if self.decoding.guidance_scale == 1.0:
            return {}
        negative = torch.tensor([self.vlm.formatter.encode_prompt(self.conversation, self.negative_condition)])
        return {"negative_input_ids": negative, "negative_attention_mask": torch.ones_like(negative),
                "guidance_scale": self.decoding.guidance_scale}

    @property
    def judge_annotations(self) -> dict[str, Any] | None:
        """What the judge knows of the image. A ShapeWorld example's first query describes its own first
        question; later user turns here are feedback on that question (as in rollouts), and a different
        first question is judged on the objects alone (mentions, not correctness)."""
        if self.annotations is None:
            return None
        first = self.conversation[0]["content"] if self.conversation else ""
        asked_example = self.example_question is not None and (
            ensure_image_token(self.example_question).strip() == first.strip()
        )
        queries = self.annotations.get("queries") or []
        return {**self.annotations, "queries": queries[:1] if asked_example else []}

    @property
    def judges_mentions_only(self) -> bool:
        """Whether the judge can check only the objects answers mention (the question is not the example's)."""
        annotations = self.judge_annotations
        return annotations is not None and not annotations.get("queries")

    def judge_available(self) -> str | None:
        """None if the last answer can be judged, else why not (in words for the user)."""
        if self.judge is None:
            return "no judge (start with --judge)"
        if self.judge.name == "annotation" and (
            self.annotations is None or not is_shapeworld(self.annotations.get("objects", []))
        ):
            return ("the annotation judge needs the image's annotations (a ShapeWorld example: --shapeworld INDEX); "
                    "configure an LLM judge (--judge-config) for other images")
        return None

    def judge_last(self) -> Judgement | JudgeFailure | None:
        """Critique and refinement of the last answer (None when there is no usable judge)."""
        if not self.conversation or self.conversation[-1]["role"] != "assistant" or self.judge_available():
            return None
        annotations = self.judge_annotations or {}
        dialogue, response = self.conversation[:-1], self.conversation[-1]["content"]
        try:
            critique = self.judge.critique(annotations, dialogue, response)
            return Judgement(critique, self.judge.refine(annotations, dialogue, response, critique))
        except JudgeFailure as failure:
            return failure


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully (so the file is closed at once)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def shapeworld_example(index: int, split: str = "test", seed: int = 0) -> tuple[Image.Image, dict[str, Any], str]:
    """ShapeWorld sample ``index``: its image, annotations and first question (without the placeholder)."""
    from dress_lightning.data.shapeworld import generate_sample
    from dress_lightning.feedback.judges import strip_image_token

    sample = generate_sample(split, seed, index)
    with Image.open(io.BytesIO(sample.image)) as image:
        picture = image.convert("RGB")
    question = strip_image_token(sample.record["conversation"][0]["content"])
    return picture, sample.record["annotations"], question


class StreamPrinter(TextStreamer):
    """Writes an answer to a text stream as it is generated."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()
