"""Memory: peak RSS of training runs and generation, checkpoint bytes vs trainable bytes, ours vs HF LLaVA.

1. Real training runs: ``python -m dress_lightning fit -c configs/sft.yaml`` and ``-c configs/crl.yaml`` for
   ``--steps`` steps (1 data worker, as the configs have; CRL on ``--nlf-shards``), each process tree's RSS
   sampled every 50 ms.
2. Their ``last.ckpt``: bytes on disk vs the bytes of the trainable parameters; the weights and the optimizer
   state in it, separately.
3. Ours vs HF LlavaForConditionalGeneration on the same work, each side in a fresh process: SFT training (plain
   loop for HF, Lightning for ours) on fixed-length batches, CRL training on CRL batches (padded), and greedy
   generation of the same prompts in batches of 32. ``speedup``: HF's peak RSS / ours for SFT (> 1: ours needs
   less); ``hf_over_ours_peak_rss`` has all three.

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
from pathlib import Path
from typing import Any

import psutil
import torch
from common import MIB, REPO, ensure_shapeworld, print_table, run_sampled, write_json


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

    # The run's own backbone config (tower, projector, what is frozen) decides its trainable set.
    task = SFTTask(model=VisionLanguageConfig(**{**ckpt["hyper_parameters"]["model"], "vision_pretrained": None}))
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


def worker(side: str, work: str, args: argparse.Namespace) -> None:
    """One side of an ours-vs-HF comparison, in its own process; prints a JSON line.

    ``work``: ``sft`` (training on fixed-length batches), ``crl`` (training on CRL batches from ``--nlf-shards``),
    ``generate`` (greedy answers to ``--prompts`` ShapeWorld prompts in batches of 32, up to 64 new tokens).
    """
    logging.disable(logging.WARNING)
    from common import (
        build_llava_reference,
        crl_batches,
        fixed_length_batches,
        freeze_like_ours,
        lightning_fit_times,
        model_batch,
        plain_loop_times,
    )

    from dress_lightning.models import VisionLanguageConfig
    from dress_lightning.tasks import CRLTask, SFTTask

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    config = VisionLanguageConfig(projector="mlp2x_gelu", freeze_language_model=False)
    task = (CRLTask if work == "crl" else SFTTask)(model=config, optimizer=adamw)
    task.configure_model()
    if work == "sft":
        batches = fixed_length_batches(task.tokenizer, task.model.num_image_tokens, task.model.vision.image_size,
                                       count=args.steps, batch_size=16, length=256)
    elif work == "crl":
        # Padded (HF takes no packed rows) and grouped by 4: the layout crl_step_cost.py's "crl" batches have.
        batches = [model_batch(b) for b in crl_batches(args.nlf_shards, str(args.train), task.condition, config,
                                                       args.steps)]
    else:
        from generation_throughput import ours_generate, prompts, reference_batched_generate

        items = prompts(str(args.val), config, args.prompts)
        pad, eos = task.tokenizer.pad_token_id, task.tokenizer.eos_token_id
    # Both sides build both models (the reference copies our weights), then drop the other one: same baseline.
    reference = build_llava_reference(task.model, task.tokenizer)
    freeze_like_ours(reference, task.model)
    if side == "hf":
        del task
        gc.collect()
        built = psutil.Process().memory_info().rss
        if work == "generate":
            reference.eval()
            reference_batched_generate(reference, items, 32, 64, pad, eos)
        else:
            plain_loop_times(reference, adamw([p for p in reference.parameters() if p.requires_grad]), batches)
    else:
        del reference
        gc.collect()
        built = psutil.Process().memory_info().rss
        if work == "generate":
            with torch.no_grad():
                ours_generate(task.model.eval(), items, 32, 64, pad, eos)
        else:
            lightning_fit_times(task, batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_mib": peak / MIB, "rss_after_build_mib": built / MIB,
                      "work_increase_mib": (peak - built) / MIB}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run")
    parser.add_argument("--prompts", type=int, default=64, help="prompts answered by each generation run")
    parser.add_argument("--nlf-shards", default="data/shards/nlf/shapeworld",
                        help="judged rollout shards for the CRL runs (default: the main job's)")
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-train")
    parser.add_argument("--shapeworld-val-dir", default="/tmp/dress-bench/shapeworld-val")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.train = ensure_shapeworld(args.shapeworld_dir, samples=1000)
    args.val = ensure_shapeworld(args.shapeworld_val_dir, samples=200, shard_size=100, split="val")
    if args.worker:
        return worker(*args.worker, args)
    logging.disable(logging.WARNING)
    nlf_shards = Path(args.nlf_shards).resolve()
    if not any(nlf_shards.glob("*.tar")):
        parser.error(f"--nlf-shards {args.nlf_shards} holds no shards: run the main job first "
                     "(python -m dress_lightning fit -c configs/crl.yaml) or point it at a rollout's --out")
    args.nlf_shards = str(nlf_shards)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "bench"),
                                                         os.environ.get("PYTHONPATH", "")])}
    runs, checkpoints = {}, {}
    with tempfile.TemporaryDirectory(prefix="dress-memory-") as tmp:
        for stage, data in (("sft", f"train_shards: {args.train}\n    val_shards: null\n    val_shapeworld: null\n"),
                            ("crl", f"nlf_shards: {nlf_shards}\n    train_shards: {args.train}\n"
                                    "    val_shards: null\n    val_shapeworld: null\n")):
            overlay = Path(tmp) / f"{stage}_overlay.yaml"
            overlay.write_text(
                f"trainer:\n  max_steps: {args.steps}\n  callbacks:\n"
                "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                f"      init_args: {{dirpath: runs/{stage}/checkpoints, save_last: true, every_n_train_steps: {args.steps}}}\n"
                f"data:\n  init_args:\n    {data}"
                # Where the run starts (the tower, the SFT model) does not change its memory: nothing is built first.
                "model:\n  init_args:\n    init_checkpoint: null\n    model: {vision_pretrained: null}\n"
                # OneCycleLR's warm-up must span at least 2 steps: the configs' 5% of a 20-step run is 1.
                "    scheduler: {init_args: {pct_start: 0.25}}\n"
            )
            cmd = [sys.executable, "-m", "dress_lightning", "fit", "-c", str(REPO / f"configs/{stage}.yaml"),
                   "-c", str(overlay)]
            runs[stage] = run_sampled(cmd, cwd=tmp, env=env)
            checkpoints[stage] = checkpoint_breakdown(Path(tmp) / f"runs/{stage}/checkpoints/last.ckpt")

    sides: dict[str, dict[str, dict]] = {}
    for work in ("sft", "crl", "generate"):
        for side in ("ours", "hf"):
            out = subprocess.run([sys.executable, __file__, "--worker", side, work, "--steps", str(args.steps),
                                  "--prompts", str(args.prompts), "--nlf-shards", args.nlf_shards,
                                  "--shapeworld-dir", args.shapeworld_dir, "--shapeworld-val-dir", args.shapeworld_val_dir],
                                 env=env, capture_output=True, text=True, check=True).stdout
            sides.setdefault(work, {})[side] = json.loads(out.strip().splitlines()[-1])

    rows = []
    for stage in runs:
        rows += [[f"{stage} run (configs/{stage}.yaml): process tree peak RSS", runs[stage]["tree_peak_rss_mib"]],
                 [f"{stage} run: largest process peak RSS", runs[stage]["largest_process_peak_rss_mib"]],
                 [f"{stage} checkpoint MiB", checkpoints[stage]["checkpoint_bytes"] / MIB],
                 [f"{stage} trainable parameters MiB", checkpoints[stage]["trainable_parameter_bytes"] / MIB],
                 [f"{stage} weights in checkpoint / trainable", checkpoints[stage]["state_dict_over_trainable"]],
                 [f"{stage} optimizer state in checkpoint MiB", checkpoints[stage]["optimizer_state_bytes"] / MIB]]
    for work, pair in sides.items():
        rows += [[f"{work}: ours peak RSS (increase over the built model)",
                  f"{pair['ours']['peak_rss_mib']:.0f} ({pair['ours']['work_increase_mib']:.0f})"],
                 [f"{work}: HF LLaVA peak RSS (increase)",
                  f"{pair['hf']['peak_rss_mib']:.0f} ({pair['hf']['work_increase_mib']:.0f})"]]
    print_table(["quantity", "MiB / ratio"], rows)
    ratios = {work: pair["hf"]["peak_rss_mib"] / pair["ours"]["peak_rss_mib"] for work, pair in sides.items()}
    print({f"{work}: HF / ours peak RSS": round(r, 3) for work, r in ratios.items()})
    write_json(args.json, {
        "speedup": ratios["sft"],
        "speedup_is": "HF LLaVA plain-loop peak RSS / ours (Lightning) peak RSS, SFT, fresh processes, same batches",
        "hf_over_ours_peak_rss": ratios,
        "training_runs": {stage: {k: v for k, v in run.items() if k != "output"} for stage, run in runs.items()},
        "checkpoints": checkpoints,
        "ours_vs_hf": sides,
        "settings": {**{k: str(v) for k, v in vars(args).items()},
                     "training_runs": "configs/{sft,crl}.yaml, 1 data worker, batch 16, fp32",
                     "ours_vs_hf": "sft: batch 16 x 256 tokens; crl: 16 padded CRL samples per batch; generate: "
                                   "batches of 32, greedy, 64 new tokens at most; mlp2x_gelu projector, fp32, AdamW"},
    })


if __name__ == "__main__":
    main()
