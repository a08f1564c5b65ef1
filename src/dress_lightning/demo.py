"""``python -m dress_lightning demo --checkpoint PATH``: a web demo on Gradio (``pip install -e ".[demo]"``).

Upload an image or pick a ShapeWorld example, ask, read the answer with the judge's critique and
refinement, press "Refine" to send the refinement (edited or replaced by your own feedback) back as
the next turn, and compare the answers under two conditions side by side. Serves on 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dress_lightning.conditions import NO_CONDITION, TARGET
from dress_lightning.decoding import Decoding
from dress_lightning.feedback.judges import Judge, JudgeFailure

if TYPE_CHECKING:  # the model and session modules import torch: only past --help
    from dress_lightning.pretrained import PretrainedVisionLanguageModel
    from dress_lightning.session import Judgement

EXAMPLES = 6
"""ShapeWorld test examples offered on the page."""


@dataclass
class PageState:
    """What one browser tab holds between events (the model itself is shared by every tab)."""

    conversation: list[dict[str, str]] = field(default_factory=list)
    annotations: dict[str, Any] | None = None
    example_question: str | None = None


def _example_label(index: int) -> str:
    return f"Example {index}"


def describe_judgement(judgement: Judgement | JudgeFailure | None, reason: str | None) -> str:
    """The critique as Markdown (or why there is none)."""
    if reason:
        return f"*No critique: {reason}.*"
    if isinstance(judgement, JudgeFailure):
        return f"*The judge failed: {judgement.reason}*"
    if judgement is None:
        return ""
    return f"**Critique** ({judgement.describe_scores()}): {judgement.critique.text}"


def build_demo(vlm: PretrainedVisionLanguageModel, judge: Judge | None, decoding: Decoding, title: str = ""):
    """The Gradio app around one loaded model."""
    import gradio as gr

    from dress_lightning.session import ChatSession, Judgement, shapeworld_example

    examples = {_example_label(i): shapeworld_example(i) for i in range(EXAMPLES)}

    def session_for(state: PageState, image, condition: str) -> ChatSession:
        if image is None:
            raise gr.Error("Upload an image or pick a ShapeWorld example first.")
        session = ChatSession(vlm, judge=judge, decoding=decoding, condition_spec=condition.strip() or TARGET)
        session.set_image(image, state.annotations, state.example_question)
        session.conversation = [dict(turn) for turn in state.conversation]
        return session

    def reply(state: PageState, image, condition: str, message: str):
        if not message.strip():
            raise gr.Error("Type a question (or feedback on the last answer) first.")
        session = session_for(state, image, condition)
        session.ask(message)
        judgement = session.judge_last()
        state = PageState(session.conversation, state.annotations, state.example_question)
        refinement = judgement.refinement if isinstance(judgement, Judgement) else ""
        critique = describe_judgement(judgement, session.judge_available())
        if session.judges_mentions_only and isinstance(judgement, Judgement):
            critique += " *(judged on the objects it mentions: the annotations answer only the example's question)*"
        return state, _chat_messages(session.conversation), critique, refinement, ""

    def pick_example(label: str):
        image, annotations, question = examples[label]
        return PageState(annotations=annotations, example_question=question), image, question, [], "", ""

    def uploaded():
        return PageState(), [], "", ""

    def compare(state: PageState, image, condition_a: str, condition_b: str, message: str):
        question = message.strip() or state.example_question
        if not question:
            raise gr.Error("Type a question to compare the two conditions on.")
        panels = []
        for condition in (condition_a, condition_b):
            session = session_for(PageState(annotations=state.annotations, example_question=state.example_question),
                                  image, condition)
            answer = session.ask(question)
            critique = describe_judgement(session.judge_last(), session.judge_available())
            panels.append(f"**Condition:** `{session.condition}`\n\n{answer or '*(empty answer)*'}\n\n{critique}")
        return panels

    with gr.Blocks(title="dress_lightning demo") as demo:
        state = gr.State(PageState())
        gr.Markdown(f"# dress_lightning demo\n{title}")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image (upload one, or pick an example)", height=256)
                example = gr.Radio(list(examples), label="ShapeWorld examples (annotated: the judge can critique)")
                condition = gr.Textbox(value=TARGET, label=f"Condition (`{TARGET}`, `{NO_CONDITION}` or text)",
                                       elem_id="condition")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Conversation", elem_id="chat", height=320)
                message = gr.Textbox(label="Your question, or feedback on the last answer", elem_id="message")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                critique = gr.Markdown(elem_id="critique")
                refinement = gr.Textbox(label="Refinement (the judge's; edit it or write your own feedback)",
                                        elem_id="refinement")
                refine = gr.Button("Refine", elem_id="refine")
        with gr.Accordion("Compare two conditions", open=True):
            with gr.Row():
                condition_b = gr.Textbox(value=NO_CONDITION, label="Second condition", elem_id="condition-b")
                compare_button = gr.Button("Compare", elem_id="compare")
            with gr.Row():
                answer_a = gr.Markdown(elem_id="compare-a")
                answer_b = gr.Markdown(elem_id="compare-b")

        outputs = [state, chat, critique, refinement, message]
        ask.click(reply, [state, image, condition, message], outputs)
        message.submit(reply, [state, image, condition, message], outputs)
        refine.click(reply, [state, image, condition, refinement], outputs)
        example.change(pick_example, [example], [state, image, message, chat, critique, refinement])
        image.upload(uploaded, None, [state, chat, critique, refinement])
        compare_button.click(compare, [state, image, condition, condition_b, message], [answer_a, answer_b])
    return demo


def _chat_messages(conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Turns for ``gr.Chatbot`` (the image placeholder is not shown)."""
    from dress_lightning.feedback.judges import strip_image_token

    return [{"role": turn["role"], "content": strip_image_token(turn["content"]) or "(empty answer)"}
            for turn in conversation]


def main(argv: Sequence[str]) -> int:
    """``demo --checkpoint PATH [--host 127.0.0.1] [--port 7860]``."""
    from dress_lightning.chat import build_judge

    parser = argparse.ArgumentParser(prog="dress-lightning demo", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="A Lightning checkpoint or a folder written by `export`.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (0.0.0.0 exposes the demo to the network).")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--judge-config", metavar="YAML",
                        help="A judge as class_path + init_args (default: the annotation judge, for ShapeWorld examples).")
    parser.add_argument("--max-new-tokens", type=int, default=Decoding.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=Decoding.temperature, help="0: greedy.")
    parser.add_argument("--guidance-scale", type=float, default=Decoding.guidance_scale,
                        help="Classifier-free guidance away from --negative-condition (as in chat); 1: off.")
    parser.add_argument("--negative-condition", default=Decoding.negative_condition)
    args = parser.parse_args(list(argv))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise SystemExit('The demo needs Gradio: pip install -e ".[demo]"') from error
    from dress_lightning.session import load_model

    vlm = load_model(args.checkpoint)
    judge = build_judge(argparse.Namespace(judge=True, judge_config=args.judge_config))
    demo = build_demo(vlm, judge, Decoding(args.max_new_tokens, args.temperature, guidance_scale=args.guidance_scale,
                                                 negative_condition=args.negative_condition),
                      title=f"Model: `{args.checkpoint}`; judge: `{judge.name}`.")
    demo.launch(server_name=args.host, server_port=args.port)
    return 0
