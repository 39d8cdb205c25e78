"""A tiny, fully offline world for the trainer tests: records over a 24-movie slice of the
shipped Reddit-v2 catalog, a byte-level BPE tokenizer trained in-process, a 2-layer Qwen2."""

from __future__ import annotations

import random

import torch

from rankgrpo.catalog import Catalog, load_default_catalog
from rankgrpo.model import build_tiny_model, prepare_tokenizer

NUM_RANKS = 4
EOS, PAD = "<|endoftext|>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def movies(n: int = 24) -> list[tuple[str, int]]:
    full = sorted(load_default_catalog())
    rng = random.Random(0)
    return sorted(rng.sample([m for m in full if m[0].isascii() and len(m[0]) < 24], n))


def make_records(n: int = 12, seed: int = 0, num_ranks: int = NUM_RANKS) -> list[dict]:
    rng = random.Random(seed)
    pool = movies()
    out = []
    for _ in range(n):
        liked = rng.sample(pool, 2)
        gt = rng.sample([m for m in pool if m not in liked], 2)
        completion = "\n".join(f"{t} ({y})" for t, y in rng.sample(pool, num_ranks))
        out.append({
            "prompt": "USER: I liked " + " and ".join(f"{t} ({y})" for t, y in liked)
                      + f". Give {num_ranks} movies.",
            "completion": completion,
            "seen_titles": [t for t, _ in liked],
            "groundtruth_with_release_year": [[t, str(y)] for t, y in gt],
        })
    return out


def make_catalog() -> Catalog:
    return Catalog(movies())


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["prompt"] + "\n" + r["completion"] for r in make_records(40, seed=1)]
    texts += ["\n".join(f"{t} ({y})" for t, y in movies())] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[
        PAD, EOS, "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    return prepare_tokenizer(fast)


def make_model(tokenizer, seed: int = 0):
    model = build_tiny_model(len(tokenizer), seed=seed, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def world_fixture(num_records: int):
    """A test module's `world` fixture (`world = world_fixture(8)`): (tokenizer, records,
    catalog) with that many records, made once per module."""
    import pytest

    @pytest.fixture(scope="module")
    def world():
        return make_tokenizer(), make_records(num_records), make_catalog()

    return world


def grpo_config(tmp_path, **kw):
    from rankgrpo.config import GRPOConfig

    base = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_prompt_length=128, max_completion_length=24,
                learning_rate=1e-3, max_steps=2, beta=0.0, save_steps=0, disable_tqdm=True,
                kernel_backend="torch", seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def params_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class ScriptedRollout:
    """A `Rollout` that samples (with the torch RNG, so runs are reproducible and resumes are
    exact) from canned completions per prompt: ground-truth hits, other catalog items,
    seen items, a malformed line, an over-long list and a truncated answer. Rewards then
    vary within every group, so every rank has a non-zero advantage somewhere."""

    def __init__(self, tokenizer, records, max_new_tokens_cap: int | None = None):
        from rankgrpo.encoding import encode_prompt

        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.by_prompt = {}
        pool = movies()
        for i, r in enumerate(records):
            gt = [f"{t} ({y})" for t, y in r["groundtruth_with_release_year"]]
            other = [f"{t} ({y})" for t, y in pool[i % 5:i % 5 + 8]]
            seen = [f"{t} (1999)" for t in r["seen_titles"]]
            cands = [
                gt + other[:NUM_RANKS - len(gt)],
                other[:NUM_RANKS - 1] + gt[:1],
                other[2:2 + NUM_RANKS],
                seen + gt,
                ["Here are movies:"] + other[:NUM_RANKS],
                other[:NUM_RANKS + 2],
                gt[:1],
            ]
            self.by_prompt[tuple(encode_prompt(tokenizer, r))] = [
                "\n".join(c) for c in cands]

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                 greedy=False):
        from rankgrpo.rollout import RolloutOutput, completion_mask, decode_completions, left_pad

        rows = []
        for p in prompts:
            texts = self.by_prompt[tuple(p)]
            j = 0 if greedy else int(torch.randint(len(texts), (1,)))
            ids = self.tokenizer(texts[j], add_special_tokens=False).input_ids + [self.eos]
            rows.append(ids[:max_new_tokens])
        pid, pmask = left_pad(prompts, self.tokenizer.pad_token_id)
        width = max(len(r) for r in rows)
        comp = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            comp[i, :len(r)] = torch.tensor(r)
        mask, truncated = completion_mask(comp, [self.eos])
        comp = torch.where(mask, comp, self.tokenizer.pad_token_id)
        return RolloutOutput(pid, pmask, comp, mask, decode_completions(self.tokenizer, comp, mask),
                             truncated)


def scripted_rollout_output(tokenizer, records, num_generations: int, seed: int = 0):
    """G scripted completions for each record's prompt (prompt-major order), fixed by seed."""
    from rankgrpo.encoding import encode_prompt

    ro = ScriptedRollout(tokenizer, records)
    prompts = [encode_prompt(tokenizer, r) for r in records for _ in range(num_generations)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = ro.generate(prompts, max_new_tokens=64)
    recs = [r for r in records for _ in range(num_generations)]
    return out, recs


def fixed_batch(tokenizer, records, catalog, cfg, model=None, ref_model=None, accelerator=None,
                rows: slice | None = None, seed: int = 0):
    """The trainer's RLBatch for scripted completions (all rows, or this process's `rows`)."""
    from rankgrpo.rl_step import add_logprobs, build_rl_batch, group_advantages_dp, score_rollout
    from rankgrpo.tokens import newline_counts

    out, recs = scripted_rollout_output(tokenizer, records, cfg.num_generations, seed)
    if rows is not None:
        out, recs = out.select(rows), recs[rows]
    scored = score_rollout(out, recs, catalog=catalog, tokenizer=tokenizer,
                           newline_table=newline_counts(tokenizer), cfg=cfg,
                           num_ranks=NUM_RANKS)
    adv, _ = group_advantages_dp(scored.rewards, cfg, accelerator)
    eos = [tokenizer.eos_token_id]
    batch = build_rl_batch(out, scored, adv, eos_ids=eos, cfg=cfg, num_ranks=NUM_RANKS,
                           accelerator=accelerator)
    if model is not None:
        batch = add_logprobs(batch, model, ref_model, cfg, accelerator)
    return batch, out, scored
