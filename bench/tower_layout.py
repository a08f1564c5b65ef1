"""Channels-last convolutions: the convolutional tower's steps on images in the default layout and channels-last.

Two costs of the embedded default's ResNet tower (``dress-tiny-rn``, 96 px):
  - ``clip_step``: a clip-stage step (``ContrastiveTowerTask``: both towers forward, ``ClipLoss``, backward,
    AdamW) on ``CaptionPairDataModule`` batches as ``configs/clip.yaml`` makes them (batch 64);
  - ``frozen_tower``: the frozen tower's forward on a batch of 32 images, what every later stage pays per step
    (the grounding warm-up's batch).
Each runs in both layouts from the same weights, interleaved round after round on the same batches; figures are
medians over rounds. ``speedup`` = the default layout's clip step / the channels-last one (what
``image_memory_format`` gains the clip stage; the weights keep their layout in both). The tokens of the two layouts agree to float rounding (printed).

    flock /tmp/dress-cpu.lock python bench/tower_layout.py --json bench/results/tower_layout.json
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from itertools import islice

import torch
from common import ensure_shapeworld, median, print_table, write_json

from dress_lightning.data.contrastive import CaptionPairDataModule
from dress_lightning.models import VisionLanguageConfig, build_vision_tower
from dress_lightning.tasks import ContrastiveTowerTask

LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def clip_task(config: VisionLanguageConfig, layout: torch.memory_format) -> ContrastiveTowerTask:
    task = ContrastiveTowerTask(model=config, export_path=None)
    task.configure_model()  # seeded init: both layouts start from the same weights
    task.image_memory_format = layout
    return task.train()


def clip_step(task: ContrastiveTowerTask, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    task.training_step(batch, 0).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def tower_forward(tower, images: torch.Tensor) -> float:
    start = time.perf_counter()
    tower(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-model", default="dress-tiny-rn")
    parser.add_argument("--batches", type=int, default=6, help="clip-stage batches, each timed once per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the step logs; without a Trainer it only warns

    config = VisionLanguageConfig(vision_model=args.vision_model, vision_pretrained=None, vision_layer=-1)
    datamodule = CaptionPairDataModule(train_shards=str(ensure_shapeworld(args.shapeworld_dir, samples=1000)),
                                       model=config, batch_size=64, num_workers=0, shuffle_buffer=1000, seed=0)
    datamodule.setup()
    batches = list(islice(datamodule.train_dataloader(), args.batches))

    tasks = {name: clip_task(config, layout) for name, layout in LAYOUTS.items()}
    optimizers = {name: torch.optim.AdamW(task.clip.parameters(), lr=1e-3, weight_decay=0.1)
                  for name, task in tasks.items()}
    towers = {name: build_vision_tower(args.vision_model, None, layer=-1).requires_grad_(False).eval()
              for name in LAYOUTS}
    for name, layout in LAYOUTS.items():
        towers[name].memory_format = layout
    images = torch.cat([b["pixel_values"] for b in batches])[:32]
    token_difference = (towers["default"](images) - towers["channels_last"](images)).abs().max().item()

    for name in LAYOUTS:  # warm-up: oneDNN primitives and allocator, untimed
        clip_step(tasks[name], optimizers[name], batches[0])
        tower_forward(towers[name], images)
    times = {f"{kind}_{name}": [] for kind in ("clip_step", "frozen_tower") for name in LAYOUTS}
    names = list(LAYOUTS)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[: r % 2]:
            times[f"clip_step_{name}"].append([clip_step(tasks[name], optimizers[name], b) for b in batches])
            times[f"frozen_tower_{name}"].append([tower_forward(towers[name], images) for _ in range(3)])

    seconds = {key: median([sum(t) / len(t) for t in rounds]) for key, rounds in times.items()}
    print_table(["layout", "clip step s (batch 64)", "frozen tower forward s (batch 32)"],
                [[name, seconds[f"clip_step_{name}"], seconds[f"frozen_tower_{name}"]] for name in LAYOUTS])
    speedup = seconds["clip_step_default"] / seconds["clip_step_channels_last"]
    tower_speedup = seconds["frozen_tower_default"] / seconds["frozen_tower_channels_last"]
    print(f"clip step: {speedup:.2f}x, frozen tower: {tower_speedup:.2f}x faster channels-last; "
          f"largest token difference between layouts {token_difference:.2e}")
    write_json(args.json, {
        "speedup": speedup,
        "speedup_is": "clip-stage step s, default layout / channels-last (same weights, same batches, interleaved)",
        "frozen_tower_speedup": tower_speedup,
        "max_token_difference": token_difference,
        "seconds": seconds,
        "times_s": times,
        "settings": {**vars(args), "clip_batch": 64, "frozen_tower_batch": 32},
    })


if __name__ == "__main__":
    main()
