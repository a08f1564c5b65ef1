"""Data pipeline throughput vs what a training step consumes.

The pipeline is ``ShardDataModule``'s training loader as configs/sft.yaml sets it up (decode, validate,
render + tokenize the conversation, open_clip preprocessing, length grouping, collate) over ShapeWorld
shards, with 0 and 2 worker processes. Consumption is samples/s of a training step of the sft.yaml model
(linear projector, LM and projector train) through the Lightning Trainer, on batches of the same pipeline.
``speedup`` = pipeline samples/s (the slower of the worker settings) / consumption samples/s.

    flock /tmp/dress-cpu.lock python bench/data_throughput.py --json bench/results/data_throughput.json
"""

from __future__ import annotations

import argparse
import logging
import time
from itertools import islice

import torch
from common import ensure_shapeworld, lightning_fit_times, median, model_batch, print_table, write_json

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import SFTTask


def datamodule(directory: str, config: VisionLanguageConfig, batch_size: int, workers: int) -> ShardDataModule:
    dm = ShardDataModule(train_shards=directory, model=config, batch_size=batch_size, num_workers=workers,
                         max_length=384, group_by_length=4, shuffle_buffer=1000)
    dm.setup()
    return dm


def pipeline_rate(dm: ShardDataModule, batches: int, skip: int) -> dict[str, float]:
    """Samples/s over ``batches`` batches after ``skip`` (start-up: worker spawn, shuffle buffer fill)."""
    start = time.perf_counter()
    stamps, samples = [], []
    for batch in islice(dm.train_dataloader(), skip + batches):
        stamps.append(time.perf_counter())
        samples.append(batch["input_ids"].shape[0])
    steady = sum(samples[skip + 1 :]) / (stamps[-1] - stamps[skip])
    return {"steady_samples_per_s": steady, "first_batch_s": stamps[0] - start,
            "overall_samples_per_s": sum(samples) / (stamps[-1] - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=24, help="batches timed per pipeline pass")
    parser.add_argument("--skip", type=int, default=3, help="start-up batches not in the steady rate")
    parser.add_argument("--train-steps", type=int, default=6, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    directory = str(ensure_shapeworld(args.shapeworld_dir, samples=1000))
    config = VisionLanguageConfig()  # configs/sft.yaml's model
    task = SFTTask(model=VisionLanguageConfig(freeze_language_model=False),
                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    task.configure_model()
    train_batches = [model_batch(b) for b in islice(datamodule(directory, config, args.batch_size, 0)
                                                     .train_dataloader(), args.warmup + args.train_steps)]
    modules = {w: datamodule(directory, config, args.batch_size, w) for w in args.workers}

    runs = {f"pipeline_{w}_workers": (lambda w=w: pipeline_rate(modules[w], args.batches, args.skip))
            for w in args.workers}
    timed_samples = sum(b["input_ids"].shape[0] for b in train_batches[args.warmup :])
    runs["training_step"] = lambda: {
        "steady_samples_per_s": timed_samples / sum(lightning_fit_times(task, train_batches)[args.warmup :])
    }
    measured: dict[str, list[dict]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            measured[name].append(runs[name]())

    results = {name: {key: median([m[key] for m in ms]) for key in ms[0]} | {"rounds": ms}
               for name, ms in measured.items()}
    consumption = results["training_step"]["steady_samples_per_s"]
    rows = []
    for name in names:
        rate = results[name]["steady_samples_per_s"]
        results[name]["ratio_to_consumption"] = rate / consumption
        rows.append([name, rate, results[name].get("first_batch_s", ""), rate / consumption])
    print_table(["stage", "samples/s (steady)", "first batch s", "x consumption"], rows)
    speedup = min(results[f"pipeline_{w}_workers"]["steady_samples_per_s"] for w in args.workers) / consumption
    write_json(args.json, {
        "speedup": speedup,
        "speedup_is": "min over worker settings of pipeline samples/s / training-step samples/s",
        "target": ">= 5",
        "met": speedup >= 5,
        "settings": {**vars(args), "max_length": 384, "group_by_length": 4, "shuffle_buffer": 1000,
                     "model": "configs/sft.yaml (linear projector; projector + LM train), fp32"},
        "results": results,
    })


if __name__ == "__main__":
    main()
