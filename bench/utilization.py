"""Achieved FLOP/s of a training step vs this machine's measured fp32 matmul peak.

Peak: a large ``torch.mm`` (default 4096^3, fp32, all torch threads). Step FLOPs: counted by
``torch.utils.flop_counter.FlopCounterMode`` over forward + loss + backward of one batch (matmuls,
attention, convolutions; elementwise ops and the optimizer count 0, so the ratio is a lower bound on
how busy the cores are). Step time: median of steps through the Lightning Trainer. Rounds alternate
peak and step measurements. ``--profile`` adds torch.profiler's top ops of one training step.

    flock /tmp/dress-cpu.lock python bench/utilization.py --profile --json bench/results/utilization.json
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from common import fixed_length_batches, lightning_fit_times, median, print_table, write_json
from torch.utils.flop_counter import FlopCounterMode

from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import SFTTask


def matmul_peak(n: int, reps: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times)


def step_flops(task: SFTTask, batch: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter:
        task.compute_loss(batch).backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile_step(task: SFTTask, batch: dict[str, torch.Tensor], optimizer, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm-up outside the profile
        task.compute_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        task.compute_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print and record torch.profiler's top ops")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    task = SFTTask(model=VisionLanguageConfig(freeze_language_model=False),
                   optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    task.configure_model()
    batches = fixed_length_batches(task.tokenizer, task.model.num_image_tokens, task.model.vision.image_size,
                                   count=args.warmup + args.steps, batch_size=args.batch_size, length=args.length)
    flops = step_flops(task, batches[0])

    peaks, steps = [], []
    for r in range(args.repeats):
        order = ("peak", "step") if r % 2 == 0 else ("step", "peak")
        for what in order:
            if what == "peak":
                peaks.append(matmul_peak(args.matmul_size, args.matmul_reps))
            else:
                steps += lightning_fit_times(task, batches)[args.warmup :]
    peak, step = median(peaks), median(steps)
    achieved = flops / step
    ratio = achieved / peak
    print_table(["quantity", "value"], [
        ["fp32 matmul peak GFLOP/s", peak / 1e9], ["step GFLOP (fwd+bwd)", flops / 1e9],
        ["median step s", step], ["achieved GFLOP/s", achieved / 1e9], ["utilization", ratio],
    ])
    result = {
        "speedup": ratio,
        "speedup_is": "achieved FLOP/s of a training step / measured fp32 matmul peak (a utilization ratio)",
        "utilization": ratio,
        "peak_flops_per_s": peak, "peak_rounds": peaks,
        "step_flops": flops, "median_step_s": step, "step_times_s": steps, "achieved_flops_per_s": achieved,
        "settings": {**vars(args), "model": "configs/sft.yaml (linear projector; projector + LM train), fp32",
                     "flops_counted": "FlopCounterMode over forward + loss + backward"},
    }
    if args.profile:
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
        result["profile_top_ops"] = profile_step(task, batches[0], optimizer, top=15)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
