"""Fixtures for the judge tests: ShapeWorld objects, a tiny saved LM, real and fault-injecting servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from dress_lightning.data.schema import ObjectAnnotation


def shape(shape: str, color: str, size: str, position: str) -> ObjectAnnotation:
    """A ShapeWorld object (the box does not matter to the judges)."""
    return ObjectAnnotation(category=shape, box=[0, 0, 10, 10], shape=shape, color=color, size=size, position=position)


@pytest.fixture
def scene() -> list[ObjectAnnotation]:
    """Two red circles, a small blue triangle and a large yellow square."""
    return [
        shape("circle", "red", "large", "top left"),
        shape("circle", "red", "small", "center"),
        shape("triangle", "blue", "small", "bottom left"),
        shape("square", "yellow", "large", "right"),
    ]


@pytest.fixture(scope="session")
def tiny_judge_model(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer Llama with the project's tokenizer (and chat template), saved to disk."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dress_lightning.models.language import BUILTIN_TOKENIZER

    path = tmp_path_factory.mktemp("tiny-judge")
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_TOKENIZER))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,  # judge prompts are long and this tokenizer splits English finely
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def transformers_server(tiny_judge_model, tmp_path_factory) -> Iterator[str]:
    """``transformers serve`` of the tiny model on a loopback port; yields the API base URL."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason="transformers serve needs the dev extra (transformers[serving])")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(tiny_judge_model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "info",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer within 180 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FakeOpenAIServer:
    """A scripted OpenAI-compatible server: each request takes the next action of ``script``.

    Actions: ``"valid"`` (a valid judge answer for the task asked: score, refinement or safety verdict), ``"500"``/``"429"``/``"400"``
    (that status), ``"401-echo"`` (401 echoing the Authorization header), ``"timeout"`` (answer
    only after ``delay`` seconds), ``"malformed-body"`` (200 with a body that is not JSON) and
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
            self.send(200, json.dumps(reply).encode())

        def send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

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
