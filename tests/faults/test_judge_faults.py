"""The LLM judge against a loopback server that fails: retried within bounds, failures never cached, no invented score."""

from __future__ import annotations

import time

import pytest

from dress_lightning.data.shapeworld import generate_record
from dress_lightning.feedback.cache import JudgeCache
from dress_lightning.feedback.judges import JudgeFailure, JudgeItem
from dress_lightning.feedback.llm_judge import LLMJudge, OpenAIChatBackend

MAX_RETRIES = 2
ATTEMPTS = 2


@pytest.fixture
def item() -> JudgeItem:
    record, _ = generate_record("train", 0, 3)
    return JudgeItem(record["annotations"], record["conversation"][:1], "There is a green square at the top.")


def _judge(base_url: str, cache: str, **backend_args) -> LLMJudge:
    backend_args = {"timeout": 2.0, "max_retries": MAX_RETRIES, "backoff": 0.01, "max_backoff": 0.2,
                    "api_key_env": None, **backend_args}
    return LLMJudge(OpenAIChatBackend(base_url, "judge-model", **backend_args), cache_path=cache, attempts=ATTEMPTS)


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "malformed-body", "drip", "retry-after:-5",
                                   "retry-after:soon", "retry-after:nan", "retry-after:Wed, 21 Oct 2015 07:28:00 GMT",
                                   "retry-after:100000"])
def test_a_transient_fault_is_retried_within_bounds(fake_openai, tmp_path, item, fault):
    fake_openai.script = [fault]
    fake_openai.delay = 3.0  # "timeout" answers after 3 s, "drip" takes 3 s in all: both over the 0.5 s timeout
    judge = _judge(fake_openai.base_url, str(tmp_path / "cache.sqlite"), timeout=0.5)
    start = time.monotonic()
    critique = judge.critique(*item)
    elapsed = time.monotonic() - start
    assert critique.scores == {"helpfulness": 7.0, "honesty": 7.0, "harmlessness": 7.0}  # the server's real answer
    assert judge.stats()["backend_retries"] == 1 and len(fake_openai.requests) == 4
    # One timeout (0.5 s) or one capped wait (max_backoff 0.2 s) at most, plus three quick answers.
    assert elapsed < 2.5, elapsed


@pytest.mark.parametrize("fault", ["500", "timeout", "text:not json", 'text:{"score": 11, "critique": "x"}'])
def test_a_persistent_fault_is_a_recorded_failure_never_cached(fake_openai, tmp_path, item, fault):
    cache = str(tmp_path / "cache.sqlite")
    fake_openai.script = [fault] * 20
    fake_openai.delay = 1.0
    judge = _judge(fake_openai.base_url, cache, timeout=0.3)
    (result,) = judge.critique_many([item])
    assert isinstance(result, JudgeFailure)  # not a score
    assert len(fake_openai.requests) <= ATTEMPTS * (MAX_RETRIES + 1)
    assert len(JudgeCache(cache)) == 0
    # The server recovers: the rerun asks again (nothing bad was cached) and gets the real answer.
    fake_openai.script = []
    assert _judge(fake_openai.base_url, cache).critique(*item).scores["honesty"] == 7.0


def test_the_cache_is_per_endpoint(fake_openai, tmp_path, item):
    cache = str(tmp_path / "cache.sqlite")
    answered = _judge(fake_openai.base_url, cache)
    answered.critique(*item)
    assert answered.stats()["calls"] == 3 and len(JudgeCache(cache)) == 3
    # Same model name, same prompt, another server (one that is down): no answer comes from the first one's cache.
    elsewhere = _judge("http://127.0.0.1:9/v1", cache, timeout=0.5)
    (result,) = elsewhere.critique_many([item])
    assert isinstance(result, JudgeFailure) and "backend error" in result.reason
    assert elsewhere.stats()["cache_hits"] == 0
    # The first server's answers are still served to a judge of that server.
    again = _judge(fake_openai.base_url, cache)
    again.critique(*item)
    assert again.stats()["cache_hits"] == 3 and again.stats()["calls"] == 0
