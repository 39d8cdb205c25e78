"""Held-out evaluation (docs/math.md section 10): greedy decoding, one generation per unique prompt,
Recall@K and NDCG@K through `rankgrpo.metrics.evaluate` (seen and out-of-catalog items are
removed, the list compacts, each ground-truth item is credited once)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import metrics as metrics_lib
from .config import EvalConfig
from .encoding import encode_prompts
from .fileio import atomic_write_text
from .model import generation_eos_ids
from .rollout import HFRollout


@torch.no_grad()
def generate_greedy(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, batch_size: int,
                    max_new_tokens: int, eos_ids: Sequence[int] | None = None,
                    progress: bool = False) -> list[str]:
    """Greedy texts for each prompt (prompts sorted by length internally for less padding);
    `progress` shows a tqdm bar over the prompts."""
    eos = list(eos_ids) if eos_ids is not None else generation_eos_ids(model, tokenizer)
    engine = HFRollout(model, tokenizer, eos, batch_size=None)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    texts: list[str] = [""] * len(prompt_ids)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="eval", unit="prompt", dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        out = engine.generate([prompt_ids[i] for i in chunk], max_new_tokens=max_new_tokens,
                              greedy=True)
        for i, t in zip(chunk, out.texts):
            texts[i] = t
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return texts


def evaluate(model, tokenizer, records: Sequence[Mapping[str, Any]], catalog, *,
             config: EvalConfig | None = None, num_ranks: int = 20, accelerator=None,
             return_generations: bool = False, progress: bool = False):
    """Recall@K / NDCG@K (and list diagnostics) of greedy generations on `records`.

    Every unique prompt is generated once; records sharing a prompt share its generation.
    Under several processes each takes a share of the unique prompts and the texts are
    gathered, so every process returns the same metrics. Prompts longer than
    config.max_prompt_length are skipped (counted in `num_skipped_long_prompt`) unless
    config.long_prompts is "error". `progress`: a progress bar (main process only).

    Returns: dict of floats (keys `recall@5`, `ndcg@5`, ..., see `metrics.evaluate`), and the
    per-record generations when return_generations is set.
    """
    cfg = config or EvalConfig()
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    enc = encode_prompts(tokenizer, records, cfg.max_prompt_length,
                         long_prompts=cfg.long_prompts, what="evaluation")
    unique: dict[tuple[int, ...], int] = {}
    which = []
    for ids in enc.prompt_ids:
        which.append(unique.setdefault(tuple(ids), len(unique)))
    prompts = [list(k) for k in unique]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(rank, len(prompts), world))
    texts_mine = generate_greedy(inner, tokenizer, [prompts[i] for i in mine],
                                 batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                 progress=progress and rank == 0)
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(list(zip(mine, texts_mine)))
    else:
        pairs = list(zip(mine, texts_mine))
    by_prompt = dict(pairs)
    generations = [by_prompt[w] for w in which]
    out = metrics_lib.evaluate(enc.records, generations, catalog, cfg.ks, ideal=cfg.ideal,
                               num_ranks=num_ranks)
    out["num_unique_prompts"] = float(len(prompts))
    out["num_skipped_long_prompt"] = float(len(enc.skipped))
    if cfg.output_file and (accelerator is None or accelerator.is_main_process):
        write_generations(cfg.output_file, enc.records, generations, catalog, num_ranks)
    if return_generations:
        return out, generations
    return out


def write_generations(path: str, records, generations, catalog, num_ranks: int) -> None:
    """One JSON line per record: prompt, generation, ground truth and its NDCG@N."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_text(path) as f:
        for rec, text in zip(records, generations):
            gt = rec["groundtruth_with_release_year"]
            items = metrics_lib.parse_recommendations(text)
            ndcg = metrics_lib.ndcg_at_k(items, gt, rec["seen_titles"], catalog,
                                         num_ranks) if gt else None
            f.write(json.dumps({"prompt": rec["prompt"], "generation": text,
                                "groundtruth_with_release_year": gt,
                                f"ndcg@{num_ranks}": ndcg}) + "\n")
