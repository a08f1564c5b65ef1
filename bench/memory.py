"""Memory: peak RSS of a training run, checkpoint bytes vs trainable-parameter bytes, ours vs HF LLaVA.

1. A real training run: ``python -m dress_lightning fit -c configs/sft.yaml`` for ``--steps`` steps on
   ShapeWorld shards (1 data worker, as the config has), its process tree's RSS sampled every 50 ms.
2. Its ``last.ckpt``: bytes on disk vs the bytes of the trainable parameters, and what fills it.
3. ``speedup``: peak RSS of HF LlavaForConditionalGeneration trained in a plain loop / peak RSS of ours
   trained through Lightning, same dims, same batches, each in a fresh process (> 1: ours needs less).

    flock /tmp/dress-cpu.lock python bench/memory.py --json bench/results/memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from common import REPO, ensure_shapeworld, print_table, write_json

MIB = 2**20


def run_sampled(cmd: list[str], cwd: str, env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; peak RSS of its whole process tree (sampled) and of its largest process (ru_maxrss)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"tree_peak_rss_mib": peak / MIB, "largest_process_peak_rss_mib": largest / MIB,
            "wall_s": time.perf_counter() - start, "output_tail": output[-2000:]}


def checkpoint_breakdown(path: Path) -> dict[str, float]:
    from dress_lightning.models import VisionLanguageConfig
    from dress_lightning.tasks import SFTTask

    ckpt = torch.load(path, map_location="cpu", weights_only=True)

    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    task = SFTTask(model=VisionLanguageConfig(freeze_language_model=False))  # configs/sft.yaml's trainable set
    task.configure_model()
    trainable = sum(p.numel() * p.element_size() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in task.parameters())
    return {
        "checkpoint_bytes": path.stat().st_size,
        "trainable_parameter_bytes": trainable,
        "all_parameter_bytes": total,
        "checkpoint_over_trainable": path.stat().st_size / trainable,
        "state_dict_bytes": tensor_bytes(ckpt["state_dict"]),
        "optimizer_state_bytes": tensor_bytes(ckpt.get("optimizer_states", [])),
        "state_dict_over_trainable": tensor_bytes(ckpt["state_dict"]) / trainable,
    }


def worker(side: str, steps: int) -> None:
    """One side of the ours-vs-HF comparison, in its own process; prints a JSON line."""
    logging.disable(logging.WARNING)
    from common import (
        build_llava_reference,
        fixed_length_batches,
        freeze_like_ours,
        lightning_fit_times,
        plain_loop_times,
    )

    from dress_lightning.models import VisionLanguageConfig
    from dress_lightning.tasks import SFTTask

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    task = SFTTask(model=VisionLanguageConfig(projector="mlp2x_gelu", freeze_language_model=False), optimizer=adamw)
    task.configure_model()
    batches = fixed_length_batches(task.tokenizer, task.model.num_image_tokens, task.model.vision.image_size,
                                   count=steps, batch_size=16, length=256)
    # Both sides build both models (the reference copies our weights), then drop the other one: same baseline.
    reference = build_llava_reference(task.model, task.tokenizer)
    freeze_like_ours(reference, task.model)
    if side == "hf":
        del task
        gc.collect()
        built = psutil.Process().memory_info().rss
        plain_loop_times(reference, adamw([p for p in reference.parameters() if p.requires_grad]), batches)
    else:
        del reference
        gc.collect()
        built = psutil.Process().memory_info().rss
        lightning_fit_times(task, batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_mib": peak / MIB, "rss_after_build_mib": built / MIB,
                      "training_increase_mib": (peak - built) / MIB}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run")
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    logging.disable(logging.WARNING)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "bench"),
                                                         os.environ.get("PYTHONPATH", "")])}
    train = ensure_shapeworld(args.shapeworld_dir, samples=1000)
    with tempfile.TemporaryDirectory(prefix="dress-memory-") as tmp:
        overlay = Path(tmp) / "overlay.yaml"
        overlay.write_text(
            f"trainer:\n  max_steps: {args.steps}\n  callbacks:\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: runs/sft/checkpoints, save_last: true, every_n_train_steps: {args.steps}}}\n"
            f"data:\n  init_args:\n    train_shards: {train}\n    val_shards: null\n    val_shapeworld: null\n"
            "model:\n  init_args:\n    init_checkpoint: null\n"  # SFT's memory; where it starts does not change it
        )
        cmd = [sys.executable, "-m", "dress_lightning", "fit", "-c", str(REPO / "configs/sft.yaml"), "-c", str(overlay)]
        run = run_sampled(cmd, cwd=tmp, env=env)
        checkpoint = checkpoint_breakdown(Path(tmp) / "runs/sft/checkpoints/last.ckpt")

    sides = {}
    for side in ("ours", "hf"):
        out = subprocess.run([sys.executable, __file__, "--worker", side, "--steps", str(args.steps)],
                             env=env, capture_output=True, text=True, check=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])

    print_table(["quantity", "MiB / ratio"], [
        ["training run: process tree peak RSS", run["tree_peak_rss_mib"]],
        ["training run: largest process peak RSS", run["largest_process_peak_rss_mib"]],
        ["checkpoint MiB", checkpoint["checkpoint_bytes"] / MIB],
        ["trainable parameters MiB", checkpoint["trainable_parameter_bytes"] / MIB],
        ["checkpoint / trainable", checkpoint["checkpoint_over_trainable"]],
        ["weights in checkpoint / trainable", checkpoint["state_dict_over_trainable"]],
        ["ours (Lightning) peak RSS", sides["ours"]["peak_rss_mib"]],
        ["HF LLaVA (plain loop) peak RSS", sides["hf"]["peak_rss_mib"]],
    ])
    speedup = sides["hf"]["peak_rss_mib"] / sides["ours"]["peak_rss_mib"]
    write_json(args.json, {
        "speedup": speedup,
        "speedup_is": "HF LLaVA plain-loop peak RSS / ours (Lightning) peak RSS, fresh processes, same batches",
        "training_run": {k: v for k, v in run.items() if k != "output_tail"},
        "checkpoint": checkpoint,
        "ours_vs_hf": sides,
        "settings": {**vars(args), "training_run": "configs/sft.yaml, 1 data worker, batch 16, fp32",
                     "ours_vs_hf": "batch 16 x 256 tokens, mlp2x_gelu projector, fp32, AdamW"},
    })


if __name__ == "__main__":
    main()
