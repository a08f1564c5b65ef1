"""Generation throughput: our batched generation (batch 1, 8, 32) vs HF LLaVA per sample and batched.

The reference is HF ``LlavaForConditionalGeneration`` with our weights (copied), called once per prompt with
one image (``model.generate(input_ids, pixel_values=...)``, KV cache, greedy), as ``llava/serve/cli.py`` does,
and on left-padded batches of the largest batch size (HF's own batched ``generate``, what a user tries first).
Ours: ``VisionLanguageModel.generate`` on left-padded batches of the same ShapeWorld prompts (vicuna_v1
template). Greedy outputs must be identical token for token; samples/s are medians over interleaved rounds.
A guided run at the largest batch (classifier-free guidance, ``l_u + g (l_c - l_u)``: 2B rows per decode step)
gives the cost of guidance against unguided decoding (issue 18: at most 2x); a run with ``share_prefix=False``
(the system prompt encoded in every row instead of once per batch) gives what sharing the prefix saves; 8 prompts
with 4 answers each (``num_return_sequences``, as rollouts sample) against the same prompts repeated 4 times give
what encoding each prompt once for all its answers saves.

    flock /tmp/dress-cpu.lock python bench/generation_throughput.py --checkpoint CKPT --json bench/results/generation_throughput.json

``--checkpoint`` takes a task checkpoint of the same config (the ViT preset, ``mlp2x_gelu`` projector, which HF
LLaVA has), e.g. from the 300-step SFT run of bench/README.md, "Run"; without one the LM is random (every answer then
runs to ``--max-new-tokens``).
"""

from __future__ import annotations

import argparse
import logging
import time
from itertools import islice

import torch
from common import build_llava_reference, ensure_shapeworld, median, print_table, write_json

from dress_lightning.data.datamodule import ShardDataModule
from dress_lightning.data.encoders import left_pad
from dress_lightning.models import VisionLanguageConfig
from dress_lightning.tasks import SFTTask


def prompts(directory: str, config: VisionLanguageConfig, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids (T,), pixel_values (3, H, W)) of the first ``count`` prompts, unpadded."""
    dm = ShardDataModule(predict_shards=directory, model=config, batch_size=1, num_workers=0)
    dm.setup()
    return [(b["input_ids"][0], b["pixel_values"][0]) for b in islice(dm.predict_dataloader(), count)]


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def ours_generate(model, items, batch_size: int, max_new_tokens: int, pad: int, eos: int,
                  guided: bool = False, share_prefix: bool = True) -> list[list[int]]:
    """``guided``: classifier-free guidance (g = 1.5) with each prompt as its own negative: the 2B-row decode
    of a guided batch, whose mix ``l_u + g (l_c - l_u)`` then equals ``l_c``, so outputs stay comparable.
    ``share_prefix``: the system prompt's KV cache computed once per batch (off: in every row)."""
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        input_ids, attention_mask = left_pad([ids for ids, _ in chunk], pad)
        guidance = ({"negative_input_ids": input_ids, "negative_attention_mask": attention_mask,
                     "guidance_scale": 1.5} if guided else {})
        new = model.generate(input_ids, attention_mask, torch.stack([px for _, px in chunk]),
                             max_new_tokens=max_new_tokens, share_prefix=share_prefix, **guidance)  # (B, T_new)
        outputs += [until_eos(row, eos) for row in new.tolist()]
    return outputs


def ours_answers_per_prompt(model, items, answers: int, max_new_tokens: int, pad: int, eos: int,
                            encode_once: bool = True) -> list[list[int]]:
    """``items`` as one batch, ``answers`` greedy answers per prompt (a rollout's ``num_samples``): each prompt
    encoded once for all its answers (``num_return_sequences``), or repeated ``answers`` times (the path before,
    and what transformers' ``generate`` does with ``num_return_sequences``: it expands the inputs first)."""
    input_ids, attention_mask = left_pad([ids for ids, _ in items], pad)
    pixel_values = torch.stack([px for _, px in items])
    if encode_once:
        new = model.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens,
                             num_return_sequences=answers)
    else:
        new = model.generate(*(t.repeat_interleave(answers, dim=0) for t in (input_ids, attention_mask, pixel_values)),
                             max_new_tokens=max_new_tokens)
    return [until_eos(row, eos) for row in new.tolist()]


@torch.no_grad()
def reference_batched_generate(reference, items, batch_size: int, max_new_tokens: int, pad: int,
                               eos: int) -> list[list[int]]:
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        input_ids, attention_mask = left_pad([ids for ids, _ in chunk], pad)
        out = reference.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 pixel_values=torch.stack([px for _, px in chunk]), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=pad)
        outputs += [until_eos(row, eos) for row in out[:, input_ids.shape[1] :].tolist()]
    return outputs


@torch.no_grad()
def reference_generate(reference, items, max_new_tokens: int, eos: int) -> list[list[int]]:
    outputs = []
    for ids, pixels in items:  # one conversation, one image per call: the CLI's loop
        out = reference.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                 pixel_values=pixels[None], max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True)
        outputs.append(until_eos(out[0, ids.shape[0] :].tolist(), eos))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="task checkpoint (mlp2x_gelu projector); default: random weights")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapeworld-dir", default="/tmp/dress-bench/shapeworld-val")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    config = VisionLanguageConfig(projector="mlp2x_gelu")
    task = SFTTask(model=config, init_checkpoint=args.checkpoint)
    task.configure_model()
    ours, tokenizer = task.model.eval(), task.tokenizer
    reference = build_llava_reference(ours, tokenizer).eval()
    items = prompts(str(ensure_shapeworld(args.shapeworld_dir, samples=200, shard_size=100, split="val")), config,
                    args.prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    runs = {f"ours_batch_{b}": (lambda b=b: ours_generate(ours, items, b, args.max_new_tokens, pad, eos))
            for b in args.batch_sizes}
    largest = max(args.batch_sizes)
    runs[f"ours_batch_{largest}_guided"] = lambda: ours_generate(ours, items, largest, args.max_new_tokens, pad, eos,
                                                                  guided=True)
    runs[f"ours_batch_{largest}_unshared_prefix"] = lambda: ours_generate(ours, items, largest, args.max_new_tokens,
                                                                          pad, eos, share_prefix=False)
    answers = 4  # per prompt, over largest / 4 prompts: the same rows per decode step as the largest batch
    few = items[: largest // answers]
    several = {f"ours_{len(few)}_prompts_x{answers}{suffix}": once
               for suffix, once in (("", True), ("_repeated_prompts", False))}
    for name, once in several.items():
        runs[name] = lambda once=once: ours_answers_per_prompt(ours, few, answers, args.max_new_tokens, pad, eos, once)
    runs["hf_llava_per_sample"] = lambda: reference_generate(reference, items, args.max_new_tokens, eos)
    runs[f"hf_llava_batch_{largest}"] = lambda: reference_batched_generate(reference, items, largest,
                                                                            args.max_new_tokens, pad, eos)
    warm = items[:2]
    ours_generate(ours, warm, 2, 4, pad, eos)
    reference_generate(reference, warm, 4, eos)

    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[list[int]]] = {}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            outputs[name] = runs[name]()
            times[name].append(time.perf_counter() - start)

    expected = outputs["hf_llava_per_sample"]
    ref_rate = args.prompts / median(times["hf_llava_per_sample"])
    results, rows = {}, []
    for name in names:
        # Runs with several answers per prompt: each of those prompts' answer, once per answer.
        want = [o for o in expected[: len(few)] for _ in range(answers)] if name in several else expected
        new_tokens = sum(len(o) for o in want)
        rate = len(want) / median(times[name])
        mismatches = sum(a != b for a, b in zip(outputs[name], want, strict=True))
        results[name] = {"samples_per_s": rate, "new_tokens_per_s": new_tokens / median(times[name]),
                         "speedup_vs_per_sample": rate / ref_rate, "outputs_differing": mismatches,
                         "times_s": times[name]}
        rows.append([name, rate, new_tokens / median(times[name]), rate / ref_rate, mismatches])
    print_table(["generation", "samples/s", "new tokens/s", "x per-sample HF", "outputs differing"], rows)
    lengths = [len(o) for o in expected]
    print(f"answer lengths: min {min(lengths)}, median {median(lengths)}, max {max(lengths)} (cap {args.max_new_tokens})")
    ours_largest, hf_batched = results[f"ours_batch_{largest}"], results[f"hf_llava_batch_{largest}"]
    speedup = ours_largest["speedup_vs_per_sample"]
    vs_batched = ours_largest["samples_per_s"] / hf_batched["samples_per_s"]
    guidance_cost = median(times[f"ours_batch_{largest}_guided"]) / median(times[f"ours_batch_{largest}"])
    prefix_sharing = median(times[f"ours_batch_{largest}_unshared_prefix"]) / median(times[f"ours_batch_{largest}"])
    encoding_once = median(times[f"ours_{len(few)}_prompts_x{answers}_repeated_prompts"]) / \
        median(times[f"ours_{len(few)}_prompts_x{answers}"])
    print(f"ours at batch {largest}: {speedup:.2f}x HF per sample, {vs_batched:.2f}x HF batched; "
          f"guided decoding costs {guidance_cost:.2f}x unguided; the shared prefix speeds it up {prefix_sharing:.2f}x; "
          f"{answers} answers per prompt, each prompt encoded once: {encoding_once:.2f}x repeating the prompts")
    identical = all(r["outputs_differing"] == 0 for r in results.values())
    write_json(args.json, {
        "speedup": speedup,
        "speedup_is": f"ours_batch_{largest} samples/s / hf_llava_per_sample samples/s",
        "speedup_vs_hf_batched": vs_batched,
        "target": ">= 8x HF per sample and >= 1.5x HF batched at batch 32, identical greedy outputs",
        "met": speedup >= 8 and vs_batched >= 1.5 and identical,
        "identical_outputs": identical,
        "guidance_cost": guidance_cost,
        "guidance_cost_is": f"ours_batch_{largest}_guided s / ours_batch_{largest} s (target <= 2)",
        "prefix_sharing": prefix_sharing,
        "prefix_sharing_is": f"ours_batch_{largest}_unshared_prefix s / ours_batch_{largest} s",
        "prompt_encoded_once": encoding_once,
        "prompt_encoded_once_is": f"ours_{len(few)}_prompts_x{answers}_repeated_prompts s / "
                                  f"ours_{len(few)}_prompts_x{answers} s (greedy, identical outputs)",
        "settings": {**vars(args), "decoding": "greedy, KV cache", "precision": "fp32"},
        "answer_lengths": {"min": min(lengths), "median": median(lengths), "max": max(lengths),
                           "at_cap": sum(n >= args.max_new_tokens for n in lengths)},
        "results": results,
        "example_answer": tokenizer.decode(expected[0], skip_special_tokens=True),
    })


if __name__ == "__main__":
    main()
