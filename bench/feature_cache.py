"""Speed-up of the frozen-tower feature cache (``cache_image_features``) on training steps.

Same weights, same ShapeWorld batches, through the Lightning Trainer: a task with the cache (filled by an
untimed first epoch, as every epoch after the first is) vs the same task without it. Two trainable sets:
``sft`` (projector + LM, configs/sft.yaml) and ``pretrain`` (projector only, configs/pretrain.yaml), where the
tower is a larger share of the step. ``speedup`` = uncached / cached median step time, sft.

    flock /tmp/dress-cpu.lock python bench/feature_cache.py --json bench/results/feature_cache.json
"""

from __future__ import annotations

import argparse
import logging
import time
from itertools import islice

import torch
from common import MODEL_KEYS, ensure_shapeworld, lightning_fit_times, median, print_table, write_json

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import PretrainTask, SFTTask


def make_task(kind: str, config: VisionLanguageConfig, cached: bool):
    cls = SFTTask if kind == "sft" else PretrainTask
    task = cls(model=config, cache_image_features=cached,
               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    torch.manual_seed(0)
    task.configure_model()
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-model", default="dress-tiny-vit", help="open_clip name (random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    config = VisionLanguageConfig(vision_model=args.vision_model, freeze_language_model=False)
    dm = ShardDataModule(train_shards=str(ensure_shapeworld(args.shapeworld_dir, samples=1000)), model=config,
                         batch_size=args.batch_size, num_workers=0, max_length=384, group_by_length=4)
    dm.setup()
    keys = (*MODEL_KEYS, "image_ids")
    batches = [{k: b[k] for k in keys} for b in islice(dm.train_dataloader(), args.steps)]
    batches = batches[: args.warmup] + batches

    tasks = {(kind, cached): make_task(kind, config, cached) for kind in ("sft", "pretrain") for cached in (False, True)}
    for task in tasks.values():  # epoch 1: fills the caches (and warms up the uncached tasks the same way)
        lightning_fit_times(task, batches)

    with torch.no_grad():  # what the cache saves per step: one forward of the frozen tower
        tower = tasks[("sft", False)].model.vision
        tower_s = []
        for _ in range(5):
            start = time.perf_counter()
            tower(batches[0]["pixel_values"])
            tower_s.append(time.perf_counter() - start)

    times: dict[tuple[str, bool], list[float]] = {key: [] for key in tasks}
    names = list(tasks)
    for r in range(args.repeats):
        for key in names[r % len(names):] + names[: r % len(names)]:
            times[key] += lightning_fit_times(tasks[key], batches)[args.warmup :]

    results, rows = {}, []
    for kind in ("sft", "pretrain"):
        plain, cached = median(times[(kind, False)]), median(times[(kind, True)])
        # Paired: batches differ in length, so compare each batch with itself (median over rounds).
        per_batch = {c: [median(times[(kind, c)][i :: args.steps]) for i in range(args.steps)] for c in (False, True)}
        paired = median([u / c for u, c in zip(per_batch[False], per_batch[True])])
        cache = tasks[(kind, True)].feature_cache
        results[kind] = {"uncached_step_s": plain, "cached_step_s": cached, "speedup": paired,
                         "uncached_times_s": times[(kind, False)], "cached_times_s": times[(kind, True)],
                         "cache_hits": cache.hits, "cache_misses": cache.misses, "cached_images": len(cache)}
        rows.append([kind, plain, cached, paired])
    print_table(["trainable", "uncached step s", "cached step s", "speedup (paired)"], rows)
    print(f"frozen tower forward, batch {args.batch_size}: {median(tower_s) * 1e3:.1f} ms")
    write_json(args.json, {
        "speedup": results["sft"]["speedup"],
        "speedup_is": "uncached / cached training-step time, sft trainable set, cache filled: median over batches "
                      "of the per-batch ratio (each batch's time the median over rounds)",
        "tower_forward_s": median(tower_s),
        "settings": {**vars(args), "precision": "fp32", "group_by_length": 4, "max_length": 384},
        "results": results,
    })


if __name__ == "__main__":
    main()
