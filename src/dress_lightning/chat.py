"""``python -m dress_lightning chat --checkpoint PATH (--image IMG | --shapeworld INDEX) [--judge]``: a terminal chat.

Anything typed that is not a command is the next user turn: a question, or feedback on the last
answer in your own words (the model answers again with it in the dialogue, as refinement NLF is
used in training). ``--script FILE`` (``-`` for stdin) reads the same lines from a file instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from dress_lightning.feedback.judges import JudgeFailure
from dress_lightning.conditions import NO_CONDITION, TARGET
from dress_lightning.decoding import Decoding

if TYPE_CHECKING:
    from dress_lightning.session import ChatSession

USER_PROMPT = "you> "
MODEL_PREFIX = "model> "

COMMANDS_HELP = """Type a question, or feedback on the last answer in your own words: it is sent as the next turn.
  /refine                         send the judge's refinement of the last answer as the next turn
  /condition target|none|TEXT     condition the next answers on the target, nothing, or TEXT
  /guidance [SCALE [NEGATIVE]]    classifier-free guidance away from NEGATIVE (none|low|TEXT); 1: off
  /image PATH | /shapeworld INDEX start over with another image
  /reset                          start over with the same image
  /help, /quit"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dress-lightning chat", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="A Lightning checkpoint or a folder written by `export`.")
    image = parser.add_mutually_exclusive_group(required=True)
    image.add_argument("--image", help="Image file to talk about.")
    image.add_argument("--shapeworld", type=int, metavar="INDEX",
                       help="ShapeWorld test example INDEX (image, annotations for the judge, and its question).")
    parser.add_argument("--judge", action="store_true",
                        help="Show the judge's critique and refinement of every answer (annotation judge).")
    parser.add_argument("--judge-config", metavar="YAML",
                        help="A judge as class_path + init_args (e.g. an LLMJudge over an endpoint); implies --judge.")
    parser.add_argument("--condition", default=TARGET,
                        help=f"`{TARGET}` (the model's own: conditional RL's target), `{NO_CONDITION}`, or condition text.")
    parser.add_argument("--script", metavar="FILE",
                        help="Read turns and commands from FILE, one per line (`-`: stdin) instead of the keyboard.")
    parser.add_argument("--max-new-tokens", type=int, default=Decoding.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=Decoding.temperature, help="0: greedy.")
    parser.add_argument("--top-p", type=float, default=Decoding.top_p)
    parser.add_argument("--guidance-scale", type=float, default=Decoding.guidance_scale,
                        help="Classifier-free guidance: l_u + g * (l_c - l_u) of the condition and the negative one; "
                             "1: off. Against `none` it needs a model trained with condition dropout "
                             "(CRL `condition.dropout`).")
    parser.add_argument("--negative-condition", default=Decoding.negative_condition,
                        help=f"What guidance steers away from: `{NO_CONDITION}`, `low` or condition text.")
    return parser


def build_judge(args: argparse.Namespace):
    """The judge the options ask for (None: no judge)."""
    if args.judge_config:
        import yaml
        from jsonargparse import ArgumentParser

        from dress_lightning.feedback.judges import Judge

        parser = ArgumentParser()
        parser.add_argument("--judge", type=Judge)
        parsed = parser.parse_object({"judge": yaml.safe_load(Path(args.judge_config).read_text())})
        return parser.instantiate_classes(parsed).judge
    if args.judge:
        from dress_lightning.feedback.annotation_judge import AnnotationJudge

        return AnnotationJudge()
    return None


class TerminalChat:
    """Reads lines, runs commands or sends turns, prints streamed answers and the judge's feedback."""

    def __init__(self, session: ChatSession, out: TextIO = sys.stdout) -> None:
        self.session = session
        self.out = out
        self.last_refinement: str | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def load_image(self, path: str | None = None, shapeworld: int | None = None) -> None:
        from dress_lightning.session import open_image, shapeworld_example

        if shapeworld is not None:
            image, annotations, question = shapeworld_example(shapeworld)
            self.session.set_image(image, annotations, question)
            self.say(f"Image: ShapeWorld test example {shapeworld}; its question: {question}")
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            self.session.set_image(open_image(path))
            self.say(f"Image: {path}")
        self.last_refinement = None

    def send(self, text: str) -> None:
        from dress_lightning.session import StreamPrinter

        streamer = StreamPrinter(self.session.vlm.tokenizer, self.out)
        self.out.write(MODEL_PREFIX)
        self.out.flush()
        self.session.ask(text, streamer=streamer)
        self.show_judgement()

    def show_judgement(self) -> None:
        if self.session.judge is None:
            return
        reason = self.session.judge_available()
        if reason:
            self.say(f"(no critique: {reason})")
            return
        judgement = self.session.judge_last()
        if isinstance(judgement, JudgeFailure):
            self.say(f"(the judge failed: {judgement.reason})")
            self.last_refinement = None
            return
        note = " (judged on the objects it mentions: the annotations answer only the example's question)"
        self.say(f"critique: {judgement.describe_scores()}. {judgement.critique.text}"
                 + (note if self.session.judges_mentions_only else ""))
        self.say(f"refinement: {judgement.refinement}  (/refine sends it)")
        self.last_refinement = judgement.refinement

    def handle(self, line: str) -> bool:
        """Run one line; returns False when the chat should end. A bad command says why and the chat goes on."""
        try:
            return self._handle(line)
        except (FileNotFoundError, ValueError) as error:
            self.say(f"(error: {error})")
            return True

    def _handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.send(line)
            return True
        command, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if command in ("quit", "exit"):
            return False
        if command == "help":
            self.say(COMMANDS_HELP)
        elif command == "refine":
            if self.last_refinement is None:
                self.say("(no refinement to send: ask something first, with --judge)")
            else:
                self.say(f"{USER_PROMPT}{self.last_refinement}")
                self.send(self.last_refinement)
        elif command == "condition":
            if not argument:
                self.say(f"condition: {self.session.condition!r}")
            else:
                self.session.condition_spec = argument
                self.say(f"(next answers are conditioned on: {self.session.condition!r})")
        elif command == "guidance":
            decoding = self.session.decoding
            if argument:
                scale, _, negative = argument.partition(" ")
                try:
                    decoding.guidance_scale = float(scale)
                except ValueError:
                    raise ValueError(f"/guidance takes a scale first (1: off, e.g. 1.5), got {scale!r}") from None
                decoding.negative_condition = negative.strip() or decoding.negative_condition
            if decoding.guidance_scale == 1.0:
                self.say("(guidance off: answers follow the condition alone; /guidance SCALE [NEGATIVE] turns it on)")
            else:
                self.say(f"(guidance {decoding.guidance_scale:g} away from: {self.session.negative_condition!r})")
        elif command == "image" and argument:
            self.load_image(path=argument)
        elif command == "shapeworld" and argument.isdigit():
            self.load_image(shapeworld=int(argument))
        elif command == "reset":
            self.session.reset()
            self.last_refinement = None
            self.say("(conversation cleared; same image)")
        else:
            self.say(f"(unknown command {line!r})\n{COMMANDS_HELP}")
        return True


def _lines(script: str | None) -> Iterator[str]:
    """Lines of the script (echoed, so a transcript reads like a chat), or keyboard input until EOF."""
    if script is not None:
        source = sys.stdin if script == "-" else open(script)  # noqa: SIM115 - closed below
        try:
            for line in source:
                if line.strip():
                    print(f"{USER_PROMPT}{line.rstrip()}", flush=True)
                    yield line
        finally:
            if source is not sys.stdin:
                source.close()
        return
    while True:
        try:
            yield input(USER_PROMPT)
        except EOFError:
            print()
            return


def main(argv: Sequence[str]) -> int:
    """``chat ...``: a multi-turn chat about one image."""
    args = build_parser().parse_args(list(argv))
    from dress_lightning.session import ChatSession, load_model  # torch and the model: only past --help

    vlm = load_model(args.checkpoint)
    session = ChatSession(vlm, judge=build_judge(args), condition_spec=args.condition,
                          decoding=Decoding(args.max_new_tokens, args.temperature, args.top_p,
                                            args.guidance_scale, args.negative_condition))
    chat = TerminalChat(session)
    chat.say(f"Model: {args.checkpoint}; condition: {session.condition!r}; judge: "
             f"{session.judge.name if session.judge else 'none'}.")
    chat.load_image(args.image, args.shapeworld)
    if args.script is None:
        chat.say(COMMANDS_HELP)
    for line in _lines(args.script):
        if not chat.handle(line):
            break
    return 0
