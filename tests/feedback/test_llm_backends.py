"""The LLM judge over real models: ``transformers serve`` on loopback and a local HF model.

The model is a randomly initialised tiny Llama, so its answers never parse: exactly the path where
the judge re-asks, then records a failure instead of a score.
"""

from __future__ import annotations

import pytest

from dress_lightning.data.shapeworld import generate_record
from dress_lightning.feedback.cache import JudgeCache
from dress_lightning.feedback.judges import Critique, JudgeFailure, JudgeItem, RefineItem
from dress_lightning.feedback.llm_judge import HFLocalBackend, LLMJudge, OpenAIChatBackend, render_messages


@pytest.fixture
def item() -> JudgeItem:
    record, _ = generate_record("train", 0, 5)
    return JudgeItem(record["annotations"], record["conversation"][:1], record["conversation"][1]["content"])


def test_transformers_serve_round_trip_and_failure(transformers_server, tiny_judge_model, tmp_path, item):
    backend = OpenAIChatBackend(
        transformers_server,
        str(tiny_judge_model),
        api_key_env=None,
        timeout=120.0,
        max_retries=1,
        backoff=0.1,
        max_tokens=8,
    )
    answer = backend.complete(render_messages("honesty", *item))
    assert isinstance(answer, str)

    judge = LLMJudge(backend, cache_path=str(tmp_path / "judge.sqlite"), attempts=2)
    (result,) = judge.critique_many([item])
    assert isinstance(result, JudgeFailure), result
    assert result.reason.startswith("helpfulness: no valid answer after 2 attempt(s)")
    stats = judge.stats()
    assert stats["calls"] == 2 and stats["retries"] == 1 and stats["failures"] == 1
    assert stats["backend_retries"] == 0
    assert len(JudgeCache(tmp_path / "judge.sqlite")) == 0  # unparseable answers are never cached: a rerun asks again


def test_hf_local_backend(tiny_judge_model, tmp_path, item):
    backend = HFLocalBackend(str(tiny_judge_model), max_new_tokens=8)
    judge = LLMJudge(backend, cache_path=str(tmp_path / "judge.sqlite"), attempts=2)
    assert judge.name == f"llm:{tiny_judge_model}"
    answer = backend.complete(render_messages("harmlessness", *item))
    assert isinstance(answer, str)

    critique = Critique({"helpfulness": 4.0, "honesty": 10.0, "harmlessness": 10.0}, "Does not answer.")
    (result,) = judge.refine_many([RefineItem(*item, critique)])
    assert isinstance(result, JudgeFailure) and result.reason.startswith("refinement:")
    assert judge.stats()["calls"] == 2 and judge.stats()["failures"] == 1
