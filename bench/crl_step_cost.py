"""Why a conditional-RL step costs more than an SFT step, and what packing does to it.

The same model (a ``CRLTask`` of the tiny preset, projector + LM training, as configs/crl.yaml has it) trains on
batches of the two data modules as the configs set them up: SFT (``configs/sft.yaml``: ShapeWorld conversations,
batch 16, length grouping 4) and CRL (``configs/crl.yaml``: judged rollout trajectories under their conditions,
refinement turns, 30% SFT data, batch 16, length grouping 4), each padded and packed padding-free
(``data.pack_sequences``), and CRL as ``configs/crl.yaml`` now batches it: unpacked, grouped by 16 batches'
lengths (``--crl-group``; sorting 16 batches' worth of samples leaves as little padding as packing, and unpacked
rows share the system prompt). A step is forward + loss + backward + AdamW step, without the Trainer; the kinds of
batch run interleaved, round after round, and each figure is a median over rounds. ``speedup`` = the packed CRL
step's seconds per real token / the configs' layout's; the target is CRL per real token at most SFT's.

    flock /tmp/dress-cpu.lock python bench/crl_step_cost.py --json bench/results/crl_step_cost.json
"""

from __future__ import annotations

import argparse
import logging
import time
from itertools import islice

import torch
from common import crl_batches, median, print_table, write_json

from dress_lightning.conditions import ConditionSettings
from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import CRLTask


def batches(datamodule: ShardDataModule, count: int) -> list[dict]:
    datamodule.setup()
    return list(islice(datamodule.train_dataloader(), count))


def step_seconds(task: CRLTask, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    task.compute_loss(batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nlf-shards", default="data/shards/nlf/shapeworld",
                        help="judged rollout shards (a rollout's --out; default: the main job's)")
    parser.add_argument("--sft-shards", default="data/shards/shapeworld/train")
    parser.add_argument("--batches", type=int, default=8, help="batches of each kind, each timed once per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--pack-length", type=int, default=None, help="data.pack_length (default: max_length)")
    parser.add_argument("--crl-group", type=int, default=16,
                        help="group_by_length of the CRL layout configs/crl.yaml uses (unpacked, the system prompt shared)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    condition = ConditionSettings()
    config = VisionLanguageConfig(vision_pretrained=None, freeze_language_model=False)
    task = CRLTask(model=config, condition=condition)
    task.configure_model()
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    kinds = {}
    for packed in (False, True):
        packing = {"pack_sequences": packed, "pack_length": args.pack_length}
        suffix = "_packed" if packed else ""
        kinds[f"sft{suffix}"] = batches(ShardDataModule(
            train_shards=args.sft_shards, max_length=384, shuffle_buffer=1000, model=config, batch_size=16,
            num_workers=0, group_by_length=4, seed=0, **packing), args.batches)
        kinds[f"crl{suffix}"] = crl_batches(args.nlf_shards, args.sft_shards, condition, config, args.batches, **packing)
    wide = f"crl_grouped{args.crl_group}"
    kinds[wide] = crl_batches(args.nlf_shards, args.sft_shards, condition, config, args.batches,
                              group_by_length=args.crl_group)
    for kind in kinds.values():  # warm-up: allocator and thread pools, untimed
        step_seconds(task, optimizer, kind[0])

    times: dict[str, list[list[float]]] = {name: [] for name in kinds}
    names = list(kinds)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append([step_seconds(task, optimizer, b) for b in kinds[name]])

    results, rows = {}, []
    for name, kind in kinds.items():
        real = sum(int(b["attention_mask"].sum()) for b in kind)
        positions = sum(b["input_ids"].numel() for b in kind)
        labelled = sum(int((b["labels"] != -100).sum()) for b in kind)
        step = median([sum(t) / len(t) for t in times[name]])
        per_token = median([sum(t) / real for t in times[name]])
        results[name] = {"real_tokens_per_batch": real / len(kind), "positions_per_batch": positions / len(kind),
                         "labelled_tokens_per_batch": labelled / len(kind), "padding_waste": 1 - real / positions,
                         "step_s": step, "s_per_1k_real_tokens": 1000 * per_token, "times_s": times[name]}
        rows.append([name, real / len(kind), positions / len(kind), labelled / len(kind), 1 - real / positions, step,
                     1000 * per_token])
    print_table(["batches", "real tokens", "positions", "labelled", "padding waste", "step s", "s / 1k real tokens"],
                rows)
    cost = {name: r["s_per_1k_real_tokens"] for name, r in results.items()}
    summary = {
        "speedup": cost["crl_packed"] / cost[wide],
        "speedup_is": f"CRL s per real token packed (configs/crl.yaml until 2026-12-04) / grouped by "
                      f"{args.crl_group} batches' lengths, unpacked (configs/crl.yaml since)",
        "crl_over_sft_per_real_token": {"padded": cost["crl"] / cost["sft"],
                                        "packed": cost["crl_packed"] / cost["sft_packed"],
                                        "packed_crl_over_padded_sft": cost["crl_packed"] / cost["sft"],
                                        "configs": cost[wide] / cost["sft"]},
        "crl_over_sft_per_step": {"padded": results["crl"]["step_s"] / results["sft"]["step_s"],
                                  "packed": results["crl_packed"]["step_s"] / results["sft_packed"]["step_s"],
                                  "configs": results[wide]["step_s"] / results["sft"]["step_s"]},
        "target": "CRL s per real token <= SFT's, each as its config batches it (configs/crl.yaml: grouped by "
                  f"{args.crl_group}; configs/sft.yaml: grouped by 4, both unpacked, the system prompt shared)",
    }
    summary["met"] = summary["crl_over_sft_per_real_token"]["configs"] <= 1.0
    print(summary)
    write_json(args.json, {**summary, "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
