"""Where a training step's time goes, ours vs HF LLaVA, and the before/after of the loss-position fix.

Without the Trainer (to see the model alone), on the same batches, interleaved, paired per batch:
  - ``hf``: HF LlavaForConditionalGeneration (logits at every position, its own loss);
  - ``ours_full_logits``: ours as it was before the fix (logits at every position, ``masked_lm_loss``);
  - ``ours``: ``VisionLanguageTask.compute_loss`` now (logits only where a next token is labelled).
Each step is forward + loss + backward + AdamW step. ``speedup`` = ours_full_logits / ours step time on
ShapeWorld batches (what the fix gained). ``--profile`` prints torch.profiler's top ops of each.

    flock /tmp/dress-cpu.lock python bench/train_step_profile.py --profile --json bench/results/train_step_profile.json
"""

from __future__ import annotations

import argparse
import logging
import time
from itertools import islice

import torch
from common import (
    build_llava_reference,
    ensure_shapeworld,
    fixed_length_batches,
    freeze_like_ours,
    median,
    model_batch,
    print_table,
    write_json,
)

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import SFTTask
from dress_lightning.tasks.losses import masked_lm_loss


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    config = VisionLanguageConfig(projector="mlp2x_gelu", freeze_language_model=False)
    task = SFTTask(model=config)
    task.configure_model()
    ours = task.model.train()
    reference = build_llava_reference(ours, task.tokenizer).train()
    freeze_like_ours(reference, ours)
    optimizers = {"ours": adamw([p for p in ours.parameters() if p.requires_grad]),
                  "hf": adamw([p for p in reference.parameters() if p.requires_grad])}

    def loss_of(side: str, batch) -> torch.Tensor:
        if side == "hf":
            return reference(**batch).loss
        if side == "ours_full_logits":
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            return masked_lm_loss(ours(**inputs).logits, batch["labels"])
        return task.compute_loss(batch)

    def step(side: str, batch) -> float:
        optimizer = optimizers["hf" if side == "hf" else "ours"]
        start = time.perf_counter()
        loss_of(side, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    dm = ShardDataModule(train_shards=str(ensure_shapeworld(args.shapeworld_dir, samples=1000)), model=config,
                         batch_size=args.batch_size, num_workers=0, max_length=384, group_by_length=4)
    dm.setup()
    sets = {
        "fixed_length": fixed_length_batches(task.tokenizer, ours.num_image_tokens, ours.vision.image_size,
                                             count=args.batches, batch_size=args.batch_size, length=args.length),
        "shapeworld": [model_batch(b) for b in islice(dm.train_dataloader(), args.batches)],
    }
    sides = ("hf", "ours_full_logits", "ours")
    for side in sides:  # warm-up
        step(side, sets["fixed_length"][0])

    results, rows = {}, []
    for name, batches in sets.items():
        times = {side: [[] for _ in batches] for side in sides}
        for r in range(args.repeats):
            for i, batch in enumerate(batches):
                for side in sides[r % 3:] + sides[: r % 3]:
                    times[side][i].append(step(side, batch))
        per_batch = {side: [median(t) for t in times[side]] for side in sides}
        labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        positions = sum(b["input_ids"].numel() for b in batches)
        results[name] = {
            "median_step_s": {side: median(per_batch[side]) for side in sides},
            "paired_speedup_vs_hf": median([h / o for h, o in zip(per_batch["hf"], per_batch["ours"])]),
            "paired_gain_of_fix": median([f / o for f, o in zip(per_batch["ours_full_logits"], per_batch["ours"])]),
            "labelled_fraction_of_positions": labelled / positions,
            "step_times_s": times,
        }
        r = results[name]
        rows.append([name, r["median_step_s"]["hf"], r["median_step_s"]["ours_full_logits"], r["median_step_s"]["ours"],
                     r["paired_speedup_vs_hf"], r["paired_gain_of_fix"], r["labelled_fraction_of_positions"]])
    print_table(["batches", "hf s", "ours before s", "ours s", "hf/ours (paired)", "before/after (paired)",
                 "labelled positions"], rows)

    profiles = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batch = sets["shapeworld"][0]
        for side in sides:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(side, batch)
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\n{side}: top ops of one ShapeWorld step (self CPU {total / 1e3:.0f} ms)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
            profiles[side] = {"self_cpu_ms": total / 1e3,
                              "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                                          for e in events[:10]]}
    write_json(args.json, {
        "speedup": results["shapeworld"]["paired_gain_of_fix"],
        "speedup_is": "step time with logits at every position (before) / logits at labelled positions (after), "
                      "ShapeWorld batches, median of per-batch ratios",
        "settings": {**vars(args), "precision": "fp32", "projector": "mlp2x_gelu", "loop": "plain (no Trainer)"},
        "results": results,
        "profiles": profiles,
    })


if __name__ == "__main__":
    main()
