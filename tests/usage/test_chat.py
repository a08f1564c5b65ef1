"""chat: driven through a pseudo-terminal as a person types, and from a script on stdin."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

from dress_lightning.chat import USER_PROMPT
from dress_lightning.session import ChatSession, Decoding, load_model, shapeworld_example

TIMEOUT = 180  # loading a model on 2 busy cores


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_a_person_asks_gives_feedback_switches_condition_and_refines(exported):
    child = pexpect.spawn(sys.executable, ["-m", "dress_lightning", "chat", "--checkpoint", str(exported),
                                           "--shapeworld", "3", "--judge", "--max-new-tokens", "6"],
                          env=_env(), encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 200))
    try:
        child.expect("condition: 'Feedback: helpfulness 10/10")  # a CRL model answers under the target by default
        child.expect("its question: (.+?)\r\n")
        child.expect_exact(USER_PROMPT)
        child.sendline("How many shapes are there?")
        child.expect_exact("model> ")
        child.expect(r"critique: helpfulness \d+/10, honesty \d+/10, harmlessness \d+/10\.")
        child.expect(r"refinement: (.+?)  \(/refine sends it\)")
        refinement = child.match.group(1)
        child.expect_exact(USER_PROMPT)

        child.sendline("You missed some shapes; count them again.")  # feedback in the user's own words
        child.expect_exact("model> ")
        child.expect("critique: ")
        child.expect(r"refinement: (.+?)  \(/refine sends it\)")
        refinement = child.match.group(1)
        child.expect_exact(USER_PROMPT)

        child.sendline("/condition Feedback: helpfulness 2/10, honesty 2/10, harmlessness 10/10.")
        child.expect_exact("conditioned on: 'Feedback: helpfulness 2/10")
        child.expect_exact(USER_PROMPT)
        child.sendline("/refine")
        child.expect_exact(f"{USER_PROMPT}{refinement}")
        child.expect_exact("model> ")
        child.expect("critique: ")
        child.expect_exact(USER_PROMPT)

        child.sendline("/image /no/such/picture.png")
        child.expect_exact("(error: image /no/such/picture.png does not exist)")
        child.expect_exact(USER_PROMPT)
        child.sendline("/guidance")
        child.expect_exact("(guidance off")
        child.expect_exact(USER_PROMPT)
        child.sendline("/guidance strong")
        child.expect_exact("(error: /guidance takes a scale first (1: off, e.g. 1.5), got 'strong')")
        child.expect_exact(USER_PROMPT)
        child.sendline("/condition target")
        child.expect_exact(USER_PROMPT)
        child.sendline("/guidance 1.5 none")
        child.expect_exact("(guidance 1.5 away from: None)")
        child.expect_exact(USER_PROMPT)
        child.sendline("Where is the circle?")
        child.expect_exact("model> ")
        child.expect_exact(USER_PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_a_script_on_stdin_drives_a_checkpoint_chat(policy_checkpoint):
    script = "Describe the image.\nThat is wrong: look at the colours.\n/condition none\nWhat shapes do you see?\n"
    result = subprocess.run(
        [sys.executable, "-m", "dress_lightning", "chat", "--checkpoint", str(policy_checkpoint), "--image",
         str(_write_example_image(policy_checkpoint.parent)), "--judge", "--script", "-", "--max-new-tokens", "5"],
        input=script, capture_output=True, text=True, env=_env(), timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith(USER_PROMPT)] == [
        f"{USER_PROMPT}{turn}" for turn in script.splitlines()
    ]
    assert sum(line.startswith("model> ") for line in lines) == 3
    # An SFT model has no condition of its own; a plain image has no annotations for the annotation judge.
    assert "condition: None" in result.stdout
    assert result.stdout.count("(no critique: the annotation judge needs the image's annotations") == 3


def _write_example_image(directory):
    image, _, _ = shapeworld_example(0)
    path = directory / "example.png"
    image.save(path)
    return path


class RecordingStreamer:
    """Records what a transformers streamer receives."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value) -> None:
        self.tokens.extend(value.tolist())

    def end(self) -> None:
        self.ended = True


def test_answers_stream_token_by_token_and_feedback_becomes_the_next_turn(exported):
    session = ChatSession(load_model(exported), decoding=Decoding(max_new_tokens=7))
    image, annotations, question = shapeworld_example(1)
    session.set_image(image, annotations, question)
    streamer = RecordingStreamer()
    answer = session.ask(question, streamer=streamer)
    assert streamer.ended and 1 <= len(streamer.tokens) <= 7
    assert session.vlm.tokenizer.decode(streamer.tokens, skip_special_tokens=True).strip() == answer
    session.ask("Count again, more carefully.")
    assert [turn["role"] for turn in session.conversation] == ["user", "assistant", "user", "assistant"]
    assert session.conversation[2]["content"] == "Count again, more carefully."
    assert session.conversation[0]["content"].startswith("<image>\n")


def test_guidance_mixes_the_condition_with_the_negative_one(exported, scramble):
    """Scale 1 is the condition alone; scale 0 is the negative condition alone (l_u + 0 * (l_c - l_u) = l_u)."""
    vlm = load_model(exported)
    scramble(vlm.model)
    image, annotations, question = shapeworld_example(2)

    def answer(**decoding) -> str:
        session = ChatSession(vlm, decoding=Decoding(max_new_tokens=12, **decoding))
        session.set_image(image, annotations, question)
        return session.ask(question)

    assert answer(guidance_scale=1.0, negative_condition="low") == answer()
    plain_low = ChatSession(vlm, decoding=Decoding(max_new_tokens=12), condition_spec="low")
    plain_low.set_image(image, annotations, question)
    under_low = plain_low.ask(question)
    assert under_low != answer()  # the two conditions answer differently, so the mixing is seen
    assert answer(guidance_scale=0.0, negative_condition="low") == under_low

    same = ChatSession(vlm, decoding=Decoding(guidance_scale=2.0, negative_condition="target"))
    same.set_image(image, annotations, question)
    with pytest.raises(ValueError, match="same condition"):
        same.ask(question)
    assert same.conversation == []  # the refused question is not left in the dialogue


def test_an_llm_judge_comes_from_a_yaml_like_the_eval_configs(tmp_path):
    import argparse

    from dress_lightning.chat import build_judge

    config = tmp_path / "judge.yaml"
    config.write_text(
        "class_path: dress_lightning.feedback.llm_judge.LLMJudge\n"
        "init_args:\n"
        "  backend:\n"
        "    class_path: dress_lightning.feedback.llm_judge.OpenAIChatBackend\n"
        "    init_args: {base_url: 'http://127.0.0.1:9/v1', model: judge-model, api_key_env: null}\n"
    )
    judge = build_judge(argparse.Namespace(judge=False, judge_config=str(config)))
    assert judge.name == "llm:judge-model"
