"""A tiny in-process LLM teacher for the Remap-Reflect-Adjust tests.

A random tiny model (`rankgrpo.tiny`) only emits special tokens, so it is taught, in a few
seconds, the two answer forms the pipeline parses: a `Title (Year)` list for the paper's
prompt (the records' own completions) and `title (year)####rating` lines for the rating
prompt. What it says is not meant to be good; that it round-trips through the parsers is.
"""

import torch

from rankgrpo.records import prompt_text
from rankgrpo.rra.reflect import RATE_PROMPT, rate_prompt
from rankgrpo.rra.teacher import conversation_of, recommend_prompt
from rankgrpo.tiny import build_tokenizer, prompt_prefix, tiny_model


def build_trained_teacher_model(records, catalog_items, *, steps: int = 40, seed: int = 0):
    """(model, tokenizer) trained on the recommend and rate prompts of `records`."""
    items = [f"{t} ({y})" for t, y in catalog_items]
    examples = []
    for i, r in enumerate(records):
        conv = conversation_of(r)
        lines = [ln for ln in r["completion"].split("\n") if ln][:10]
        examples.append((recommend_prompt(conv, 20), "\n".join(lines)))
        pairs = [ln.rsplit(" (", 1) for ln in lines[:5]]
        cands = [(t, int(y.rstrip(")"))) for t, y in pairs]
        rating = "\n".join(f"{ln}####{(i + j) % 5 - 2}" for j, ln in enumerate(lines[:5]))
        examples.append((rate_prompt(conv.text, cands), rating))
    texts = ([prompt_text(r) for r in records] + [r["completion"] for r in records]
             + [RATE_PROMPT] + [p for p, _ in examples])
    tok = build_tokenizer(items, texts, phrases=[prompt_prefix(20)],
                          words=["####", "-2", "-1", "0", "1", "2"])
    model = tiny_model(tok, seed=seed, max_position_embeddings=2048)
    seqs = []
    for prompt, completion in examples:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                    add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((list(p), list(c)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [seqs[int(i)] for i in torch.randint(0, len(seqs), (4,), generator=gen)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (p, c) in enumerate(batch):
            seq = p + c
            ids[j, :len(seq)] = torch.tensor(seq)
            labels[j, len(p):len(seq)] = torch.tensor(c)
            att[j, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def save_teacher(model, tok, folder) -> None:
    """Save for the HTTP server process (`tests/_rra_chat_server.py --model-dir`)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
