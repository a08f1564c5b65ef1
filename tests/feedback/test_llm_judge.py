"""LLM judge: prompts, strict parsing, and the HTTP client against a fault-injecting server."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from dress_lightning.cli import main
from dress_lightning.data.shapeworld import generate_record
from dress_lightning.feedback.cache import JudgeCache
from dress_lightning.feedback.judges import Critique, JudgeFailure, JudgeItem, RefineItem, SafetyVerdict
from dress_lightning.feedback.llm_judge import (
    PROMPT_VERSION,
    RUBRICS,
    AnswerFormatError,
    LLMJudge,
    OpenAIChatBackend,
    parse_answer,
    render_messages,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def item() -> JudgeItem:
    """The first turn of a generated ShapeWorld sample, answered with a hallucination."""
    record, _ = generate_record("train", 0, 3)
    dialogue = record["conversation"][:1]
    return JudgeItem(record["annotations"], dialogue, "There is a green square at the top.")


def judge_for(server, tmp_path, attempts: int = 3, **backend_args) -> LLMJudge:
    backend_args = {"timeout": 5.0, "max_retries": 3, "backoff": 0.01, "api_key_env": None, **backend_args}
    backend = OpenAIChatBackend(server.base_url, "judge-model", **backend_args)
    return LLMJudge(backend, cache_path=str(tmp_path / "judge.sqlite"), attempts=attempts)


def test_prompts_render_annotations_dialogue_and_rubric(item):
    messages = render_messages("honesty", *item)
    assert [m["role"] for m in messages] == ["system", "user"]
    prompt = messages[1]["content"]
    objects = item.annotations["objects"]
    assert f"box [{', '.join(f'{v:g}' for v in objects[0]['box'])}]" in prompt
    assert f"{objects[0]['color']} {objects[0]['shape']}" in prompt
    assert "Reference answer" in prompt and "<image>" not in prompt
    assert RUBRICS["honesty"] in prompt and RUBRICS["helpfulness"] not in prompt
    assert "There is a green square at the top." in prompt and '"score"' in prompt
    refinement = render_messages("refinement", *item, Critique({"honesty": 4.0}, "Mentions a green square."))
    assert "Mentions a green square." in refinement[1]["content"] and '"refinement"' in refinement[1]["content"]
    assert PROMPT_VERSION.startswith("dress-judge-v")


PROMPT_DIGESTS = {"dress-judge-v1": "5114a11258e19d27d7396e2fe9ac2ac31383d40bdd690d58e324a723eeafc983"}
"""sha256 of the prompts of ``item`` for every task, per prompt version."""


def test_a_prompt_change_comes_with_a_new_prompt_version(item):
    # Prompts are built from several modules (templates here, the penalties of feedback.findings, the
    # wording of data.phrases); a change to any of them makes cached answers and recorded feedback stale.
    messages = [render_messages(task, *item) for task in ("helpfulness", "honesty", "harmlessness", "safety_verdict")]
    messages.append(render_messages("refinement", *item, Critique({"honesty": 4.0}, "Mentions a green square.")))
    digest = hashlib.sha256(json.dumps(messages).encode()).hexdigest()
    assert PROMPT_DIGESTS.get(PROMPT_VERSION) == digest, (
        f"the judge prompts changed: bump PROMPT_VERSION and add its digest {digest} to PROMPT_DIGESTS"
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"score": 7, "critique": "ok"}',
        '```json\n{"score": 7, "critique": "ok"}\n```',
        ' ```\n{"score": 7, "critique": "ok"}```',
    ],
)
def test_parse_accepts_strict_json(text):
    assert parse_answer(text, "honesty") == {"score": 7, "critique": "ok"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("The score is 7.", "not a JSON object"),
        ('Sure! {"score": 7, "critique": "ok"}', "not a JSON object"),
        ('["score", 7]', "expected a JSON object"),
        ('{"critique": "ok"}', "missing key 'score'"),
        ('{"score": 11, "critique": "ok"}', "outside"),
        ('{"score": 0, "critique": "ok"}', "outside"),
        ('{"score": 7.5, "critique": "ok"}', "must be an integer"),
        ('{"score": "7", "critique": "ok"}', "must be an integer"),
        ('{"score": true, "critique": "ok"}', "must be an integer"),
        ('{"score": 7, "critique": " "}', "is empty"),
    ],
)
def test_parse_rejects_anything_else(text, problem):
    with pytest.raises(AnswerFormatError, match=problem):
        parse_answer(text, "honesty")
    with pytest.raises(AnswerFormatError, match="missing key 'refinement'"):
        parse_answer('{"score": 7, "critique": "ok"}', "refinement")


def test_safety_verdict_prompt_and_answer(fake_openai, tmp_path, item):
    messages = render_messages("safety_verdict", *item)
    assert '"persuasive"' in messages[1]["content"] and "harmful intent" in messages[1]["content"]
    assert parse_answer('{"relevant": true, "safe": false, "persuasive": false, "reason": "x"}', "safety_verdict")
    with pytest.raises(AnswerFormatError, match="'safe' must be true or false"):
        parse_answer('{"relevant": true, "safe": 1, "persuasive": false, "reason": "x"}', "safety_verdict")
    fake_openai.script = [
        "text:" + json.dumps({"relevant": True, "safe": "yes", "persuasive": False, "reason": "r"}),
        "text:" + json.dumps({"relevant": True, "safe": True, "persuasive": False, "reason": "No alternative."}),
    ]
    judge = judge_for(fake_openai, tmp_path)
    assert judge.safety_verdict(*item) == SafetyVerdict(relevant=True, safe=True, persuasive=False)
    assert judge.stats()["retries"] == 1 and len(fake_openai.requests) == 2


def test_valid_first_try(fake_openai, tmp_path, item):
    judge = judge_for(fake_openai, tmp_path)
    critique = judge.critique(*item)
    assert critique.scores == {"helpfulness": 7.0, "honesty": 7.0, "harmlessness": 7.0}
    assert fake_openai.score_answer["critique"] in critique.text
    assert judge.refine(*item, critique) == "Remove the green square."
    assert len(fake_openai.requests) == 4
    assert judge.stats() == {
        "calls": 4,
        "cache_hits": 0,
        "retries": 0,
        "failures": 0,
        "backend_requests": 4,
        "backend_retries": 0,
    }
    body = fake_openai.requests[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "malformed-body"])
def test_transport_faults_are_retried(fake_openai, tmp_path, item, fault):
    fake_openai.script = [fault]
    fake_openai.delay = 1.0
    judge = judge_for(fake_openai, tmp_path, timeout=0.3)
    critique = judge.critique(*item)
    assert critique.scores["honesty"] == 7.0
    stats = judge.stats()
    assert stats["backend_retries"] == 1 and stats["backend_requests"] == 4 and stats["retries"] == 0
    assert len(fake_openai.requests) == 4


def test_backoff_doubles(fake_openai, tmp_path, item):
    fake_openai.script = ["500", "500", "500"]
    judge = judge_for(fake_openai, tmp_path, backoff=0.05)
    start = time.monotonic()
    judge.critique(*item)
    assert time.monotonic() - start >= 0.05 + 0.1 + 0.2
    assert judge.stats()["backend_retries"] == 3


def test_client_errors_are_not_retried(fake_openai, tmp_path, item):
    fake_openai.script = ["400"]
    judge = judge_for(fake_openai, tmp_path)
    (result,) = judge.critique_many([item])
    assert isinstance(result, JudgeFailure) and "HTTP 400" in result.reason
    assert len(fake_openai.requests) == 1 and judge.stats()["failures"] == 1


def test_persistent_server_errors_fail(fake_openai, tmp_path, item):
    fake_openai.script = ["500"] * 3
    judge = judge_for(fake_openai, tmp_path, max_retries=2)
    (result,) = judge.critique_many([item])
    assert isinstance(result, JudgeFailure) and "3 attempts" in result.reason
    assert len(fake_openai.requests) == 3


def test_unparseable_answer_is_re_asked_with_the_error(fake_openai, tmp_path, item):
    fake_openai.script = ["text:I would give it a seven."]
    judge = judge_for(fake_openai, tmp_path)
    critique = judge.critique(*item)
    assert critique.scores["helpfulness"] == 7.0
    assert judge.stats()["retries"] == 1 and len(fake_openai.requests) == 4
    re_ask = fake_openai.requests[1]["body"]["messages"]
    assert [m["role"] for m in re_ask] == ["system", "user", "assistant", "user"]
    assert re_ask[2]["content"] == "I would give it a seven." and "not a JSON object" in re_ask[3]["content"]


def test_all_attempts_unparseable_is_a_failure_not_a_score(fake_openai, tmp_path, item):
    fake_openai.script = ['text:{"score": 12, "critique": "great"}', "text:seven"]
    judge = judge_for(fake_openai, tmp_path, attempts=2)
    results = judge.critique_many([item])
    assert isinstance(results[0], JudgeFailure)
    assert "helpfulness" in results[0].reason and "2 attempt" in results[0].reason
    assert len(fake_openai.requests) == 2  # the failed aspect ends the critique; nothing is filled in
    assert judge.stats()["failures"] == 1 and judge.stats()["retries"] == 1
    fake_openai.script = ["text:no", "text:still no"]
    with pytest.raises(JudgeFailure, match="refinement"):
        judge.refine(*item, Critique({"honesty": 4.0}, "Mentions a green square."))


def test_cache_survives_restart(fake_openai, tmp_path, item):
    fake_openai.script = ["text:not json"]
    first = judge_for(fake_openai, tmp_path)
    critique = first.critique(*item)
    refinement = first.refine(*item, critique)
    calls = len(fake_openai.requests)
    # 5 answers, 4 cached: the unparseable first answer is not (it would fail the item on every rerun).
    assert calls == 5 and len(JudgeCache(tmp_path / "judge.sqlite")) == 4
    # A new process: new backend, judge and cache objects over the same file.
    second = judge_for(fake_openai, tmp_path)
    assert second.critique(*item) == critique and second.refine(*item, critique) == refinement
    assert len(fake_openai.requests) == calls + 1  # the prompt that got no usable answer is asked again
    calls += 1
    assert second.stats() == {
        "calls": 1,
        "cache_hits": 3,
        "retries": 0,
        "failures": 0,
        "backend_requests": 1,
        "backend_retries": 0,
    }
    # Another model or other decoding parameters are other cache entries.
    judge_for(fake_openai, tmp_path, max_tokens=64).critique(*item)
    assert len(fake_openai.requests) == calls + 3


def test_concurrency_is_limited_and_order_kept(fake_openai, tmp_path):
    fake_openai.latency = 0.05
    judge = judge_for(fake_openai, tmp_path, max_concurrency=3)
    records = [generate_record("train", 0, i)[0] for i in range(6)]
    items = [JudgeItem(r["annotations"], r["conversation"][:1], f"Answer {i}.") for i, r in enumerate(records)]
    results = judge.critique_many(items)
    assert all(isinstance(r, Critique) for r in results)
    assert 1 < fake_openai.max_in_flight <= 3
    refinements = judge.refine_many([RefineItem(*i, results[0]) for i in items])
    assert refinements == ["Remove the green square."] * len(items)
    # The order of results is the order of items: each prompt holds its own response.
    prompts = [json.dumps(r["body"]) for r in fake_openai.requests]
    assert all(any(f"Answer {i}." in p for p in prompts) for i in range(6))


def test_api_key_never_logged_or_cached(fake_openai, tmp_path, item, monkeypatch, caplog):
    secret = "sk-test-5ecret-never-log-me"
    monkeypatch.setenv("DRESS_JUDGE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    fake_openai.script = ["500", "text:no json here"]
    judge = judge_for(fake_openai, tmp_path, api_key_env="DRESS_JUDGE_TEST_KEY")
    critique = judge.critique(*item)
    assert fake_openai.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    # A server that echoes the key in an error body: the failure reason must not carry it.
    fake_openai.script = ["401-echo"]
    (failure,) = judge.refine_many([RefineItem(*item, critique)])
    assert isinstance(failure, JudgeFailure) and "HTTP 401" in failure.reason
    assert secret not in failure.reason and "DRESS_JUDGE_TEST_KEY" in failure.reason
    assert caplog.records and secret not in caplog.text
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path


def test_judges_are_configured_by_class_path(tmp_path):
    from jsonargparse import ArgumentParser

    from dress_lightning.feedback.judges import Judge

    parser = ArgumentParser()
    parser.add_argument("--judge", type=Judge)
    config = parser.parse_object(
        {
            "judge": {
                "class_path": "dress_lightning.feedback.llm_judge.LLMJudge",
                "init_args": {
                    "backend": {
                        "class_path": "dress_lightning.feedback.llm_judge.OpenAIChatBackend",
                        "init_args": {
                            "base_url": "http://127.0.0.1:1/v1",
                            "model": "judge-model",
                            "max_concurrency": 4,
                        },
                    },
                    "cache_path": str(tmp_path / "judge.sqlite"),
                },
            }
        }
    )
    judge = parser.instantiate(config).judge
    assert isinstance(judge, LLMJudge) and judge.name == "llm:judge-model" and judge.version == PROMPT_VERSION
    assert judge.max_concurrency == 4


def test_evaluate_with_the_llm_judge_over_http(fake_openai, policy_checkpoint, tmp_path):
    """The evaluate command with an LLMJudge over a loopback server: scores, verdicts, cache and versions."""
    judge = {"class_path": "dress_lightning.feedback.llm_judge.LLMJudge",
             "init_args": {"backend": {"class_path": "dress_lightning.feedback.llm_judge.OpenAIChatBackend",
                                       "init_args": {"base_url": fake_openai.base_url, "model": "judge-model",
                                                     "api_key_env": None}},
                           "cache_path": str(tmp_path / "cache.sqlite")}}
    overlay = {"checkpoint": str(policy_checkpoint), "out": str(tmp_path / "report"), "judge": judge,
               "sets": [{"name": "shapeworld", "shards": str(tmp_path / "prompts"), "samples": 6,
                         "shapeworld": {"split": "test", "samples": 6, "seed": 0, "shard_size": 3},
                         "categories": ["describe", "count", "color", "shape", "exists", "position", "conversation"],
                         "vocabulary": "shapeworld", "refinement_turns": 1}],
               "generation": {"max_new_tokens": 8}, "batch_size": 3, "num_workers": 0}
    (tmp_path / "eval.yaml").write_text(json.dumps(overlay))
    args = ["evaluate", "-c", str(ROOT / "configs/eval.yaml"), "-c", str(tmp_path / "eval.yaml")]
    assert main(args) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["provenance"]["judge"] == {"name": "llm:judge-model", "version": PROMPT_VERSION}
    metrics = report["sets"]["shapeworld"]["metrics"]
    # The server scores every aspect 7/10 and calls each harmful answer relevant and safe, not persuasive.
    assert metrics["helpfulness"]["overall"] == pytest.approx(0.7)
    # The six test prompts hold one harmful-intent request (index 4).
    assert (metrics["safety"]["safety"], metrics["safety"]["persuasiveness"]) == (1.0, 0.0)
    assert metrics["interaction"]["refined"] == 1.0 and metrics["interaction"]["mean_gain"] == 0.0
    calls = len(fake_openai.requests)
    assert calls and report["sets"]["shapeworld"]["judge_failures"] == 0
    # Run again: every judge answer comes from the cache, no request reaches the server.
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert len(fake_openai.requests) == calls and again["sets"]["shapeworld"]["metrics"] == metrics
    assert again["sets"]["shapeworld"]["judge_calls"]["calls"] == 0
