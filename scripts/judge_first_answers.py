"""Judge checkpoints' first answers on prompt shards: annotation-judge 3H means and exact match.

A stop-gap until the evaluation runner: the numbers in the SFT / CRL notes come from

    python scripts/judge_first_answers.py data/shards/shapeworld/val runs/sft/checkpoints/last.ckpt \
        runs/crl/checkpoints/last.ckpt

Each checkpoint answers the first user turn of every sample greedily, conditioned as it generates
by default (CRL: the target condition); the exact annotation judge scores each answer.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.schema import Sample
from dress_lightning.feedback.annotation_judge import AnnotationJudge
from dress_lightning.inference import load_task
from dress_lightning.tasks import GenerationSettings


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).split()


def judge_checkpoint(checkpoint: str, prompts: str, judge: AnnotationJudge, max_new_tokens: int) -> dict:
    torch.manual_seed(0)
    task = load_task(checkpoint)
    datamodule = ShardDataModule(predict_shards=prompts, batch_size=32, num_workers=0, model=task.model_config,
                                 predict_condition=task.generation_condition())
    datamodule.setup()
    scores, exact, total = defaultdict(list), 0, 0
    for batch in datamodule.predict_dataloader():
        for fields, (answer,) in zip(batch["samples"], task.generate(batch, GenerationSettings(max_new_tokens))):
            record = Sample(**fields).record
            critique = judge.critique(record["annotations"], record["conversation"][:1], answer)
            for aspect, score in critique.scores.items():
                scores[aspect].append(score)
            exact += words(answer) == words(record["conversation"][1]["content"])
            total += 1
    return {"prompts": total, "exact_match": exact / total, **{a: sum(v) / len(v) for a, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", help="prompt shards (directory, brace pattern or URL)")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    judge = AnnotationJudge()
    for checkpoint in args.checkpoints:
        result = judge_checkpoint(checkpoint, args.prompts, judge, args.max_new_tokens)
        print(json.dumps({"checkpoint": checkpoint, **result}), flush=True)


if __name__ == "__main__":
    main()
