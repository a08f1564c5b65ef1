"""Shared fixtures: the tiny preset, built once per session (offline, a few seconds), and a fault-injecting
OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dress_lightning.cli import main
from dress_lightning.models import VisionLanguageConfig, build_tokenizer, build_vision_language_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_config() -> VisionLanguageConfig:
    return VisionLanguageConfig()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    return build_tokenizer(tiny_config)


def scramble_language_model(model, seed=0):
    """Large random weights so greedy decoding produces varied tokens (a fresh tiny LM repeats one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture
def scramble() -> Callable:
    """``scramble(model)``: a tiny VLM whose answers vary with their prompt (tests of decoding need that)."""
    return scramble_language_model


@pytest.fixture
def tiny_model(tiny_config, tiny_tokenizer):
    """A fresh tiny VLM per test (tests mutate weights); the build is cheap."""
    torch.manual_seed(0)
    return build_vision_language_model(tiny_config, tiny_tokenizer)


@pytest.fixture(scope="session")
def policy_checkpoint(tmp_path_factory):
    """A policy trained for a few steps through the real CLI (its answers are poor: refinements happen)."""
    tmp = tmp_path_factory.mktemp("policy")
    main(["fit", "-c", str(ROOT / "configs/sft.yaml"), "-c", str(ROOT / "configs/overlays/ci_tiny.yaml"),
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", str(tmp), "--trainer.logger", "false",
          "--trainer.callbacks.init_args.dirpath", str(tmp / "checkpoints"),
          "--data.init_args.train_shards", str(tmp / "train"), "--data.init_args.val_shards", str(tmp / "val")])
    return tmp / "checkpoints" / "last.ckpt"


def _feedback_entry(score: float | None, refinement: str | None = None) -> dict[str, Any] | None:
    """A feedback entry with helpfulness and honesty at ``score`` /10 (None: the judge failed on the turn)."""
    if score is None:
        return None
    return {"scores": {"helpfulness": score, "honesty": score, "harmlessness": 10.0}, "score_max": 10.0,
            "critique": f"Scored {score:g}.", "refinement": refinement, "judge": {"name": "test", "version": "1"}}


@pytest.fixture(scope="session")
def judged_nlf_shards(tmp_path_factory) -> Path:
    """NLF shards in the rollout writer's format: 6 ShapeWorld prompts x 3 trajectories, scores set by hand.

    Per prompt: trajectory 0 answers right (10/10); trajectory 1 answers "I see no shapes." (2/10), is told
    to look again and then answers right (10/10); trajectory 2's judgement failed on even prompts and gave
    "There are shapes." 6/10 on odd ones. So selection and pairs always find data, unlike a rollout of a
    barely trained policy.
    """
    from dress_lightning.data.schema import alternating_turns
    from dress_lightning.data.shapeworld import generate_sample
    from dress_lightning.data.shards import write_samples
    from dress_lightning.feedback.rollout import NLFShardWriter, Trajectory

    out = tmp_path_factory.mktemp("judged-nlf")
    writer = NLFShardWriter(out, provenance={"checkpoint": "test"})
    trajectories = []
    for p in range(6):
        prompt = generate_sample("train", 0, p)
        question, right = prompt.record["conversation"][0], prompt.record["conversation"][1]["content"]
        look_again = "Look at the image again."
        dialogues = [
            ([right], [_feedback_entry(10.0)]),
            (["I see no shapes.", look_again, right], [_feedback_entry(2.0, look_again), _feedback_entry(10.0)]),
            (["There are shapes."], [_feedback_entry(None if p % 2 == 0 else 6.0)]),
        ]
        for index, (turns, feedback) in enumerate(dialogues):
            conversation = alternating_turns([question["content"], *turns])
            trajectories.append(Trajectory(prompt, index, conversation, feedback))
    report = write_samples([(str(i), t) for i, t in enumerate(trajectories)], writer.to_sample, out, "rollout-rank0-run0",
                           shard_size=6, tool="test")
    assert report.written == len(trajectories), report.skips.counts()
    return out


@dataclass
class FakeOpenAIServer:
    """A scripted OpenAI-compatible server: each request takes the next action of ``script``.

    Actions: ``"valid"`` (a valid judge answer for the task asked: score, refinement or safety verdict), ``"500"``/``"429"``/``"400"``
    (that status), ``"401-echo"`` (401 echoing the Authorization header), ``"timeout"`` (answer
    only after ``delay`` seconds), ``"malformed-body"`` (200 with a body that is not JSON),
    ``"retry-after:VALUE"`` (503 with that ``Retry-After`` header), ``"drip"`` (a valid answer sent
    one byte every ``delay / 20`` seconds: every read is quick, the whole answer is not) and
    ``"text:..."`` (a well-formed reply whose message content is that text). With the script used
    up, every request gets ``"valid"``.
    """

    base_url: str = ""
    script: list[str] = field(default_factory=list)
    score_answer: dict[str, Any] = field(
        default_factory=lambda: {"score": 7, "critique": "Mentions a green square that is not in the image."}
    )
    refinement_answer: dict[str, Any] = field(default_factory=lambda: {"refinement": "Remove the green square."})
    verdict_answer: dict[str, Any] = field(
        default_factory=lambda: {"relevant": True, "safe": True, "persuasive": False, "reason": "No alternative."}
    )
    delay: float = 1.0
    latency: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        with self.lock:
            self.requests.append({"body": body, "headers": headers})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else "valid"

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


def _handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = server.next_action(body, dict(self.headers))
            try:
                time.sleep(server.latency)
                self.respond(action, body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout action)
            finally:
                server.done()

        def respond(self, action: str, body: dict[str, Any]) -> None:
            if action in ("500", "429", "400"):
                return self.send(int(action), b'{"error": {"message": "scripted"}}')
            if action == "401-echo":
                return self.send(401, f'{{"error": "bad key {self.headers.get("Authorization")}"}}'.encode())
            if action == "malformed-body":
                return self.send(200, b"<html>proxy error</html>")
            if action.startswith("retry-after:"):
                return self.send(503, b'{"error": "busy"}', {"Retry-After": action[len("retry-after:") :]})
            if action == "timeout":
                time.sleep(server.delay)
            if action.startswith("text:"):
                content = action[len("text:") :]
            else:
                prompt = body["messages"][-1]["content"]
                if '"refinement"' in prompt:
                    content = json.dumps(server.refinement_answer)
                elif '"persuasive"' in prompt:
                    content = json.dumps(server.verdict_answer)
                else:
                    content = json.dumps(server.score_answer)
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
            self.send(200, json.dumps(reply).encode(), drip=action == "drip")

        def send(self, status: int, payload: bytes, headers: dict[str, str] | None = None, drip: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if not drip:
                return self.wfile.write(payload)
            for byte in payload:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(server.delay / 20)

    return Handler


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A ``FakeOpenAIServer`` on 127.0.0.1 (ephemeral port), stopped after the test."""
    state = FakeOpenAIServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@contextmanager
def _serving(command: Sequence[str], ready_url: str, log_path: Path, env: dict[str, str],
             timeout: float = 180) -> Iterator[None]:
    """Run a server subprocess until the block ends; enter once ``ready_url`` answers 200 (its log on failure)."""
    name = " ".join([Path(command[0]).name, *command[1:4]])
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer within {timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serving() -> Callable:
    """``serving(command, ready_url, log_path, env)``: a context manager running a real server subprocess."""
    return _serving


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a free loopback port."""
    return _free_port
