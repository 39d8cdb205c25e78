"""Peak memory of one loss step (loss + backward) through TRL 1.16's own
`GRPOTrainer._compute_loss` and through `RankGRPOTrainer._compute_loss`, at V = 32000.

    python docs/integrations_logs/trainer_loss_memory.py [--tokens 1024] [--rows 4]

Each trainer runs in its own process (glibc's mmap threshold pinned, as the bench's `cpu`
suites do), on the same random Qwen2 (hidden 256, 2 layers, vocabulary 32000, tied embeddings)
and the same batch of `rows` completions of `tokens` tokens (TRL's default dapo loss, token
level, beta = 0). One warm-up step allocates the gradients; the measured step is the growth of
the process's peak resident set (VmHWM) over the step, so it counts the activations, the
log-prob pass and the backward, not the parameters or their gradients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker(which: str, tokens: int, rows: int, model_dir: str) -> dict:
    sys.path[:0] = [str(ROOT)]
    from bench.memory import CpuPeak, pin_mmap_threshold

    pinned = pin_mmap_threshold()
    import datasets
    import torch
    import trl

    from rankgrpo.integrations.trl import RankGRPOTrainer
    from rankgrpo.tiny import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(["Alien (1979)", "Heat (1995)"], texts=["films like alien"])
    cls = trl.GRPOTrainer if which == "trl" else RankGRPOTrainer
    cfg = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[],
                         save_strategy="no", per_device_train_batch_size=rows,
                         num_generations=rows, max_completion_length=tokens, beta=0.0)
    tr = cls(model=model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions),
             args=cfg, train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * rows}),
             processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(1)
    v = tr.model.config.vocab_size
    mask = torch.ones(rows, tokens, dtype=torch.long)
    inputs = {"prompt_ids": torch.randint(0, v, (rows, 8), generator=g),
              "prompt_mask": torch.ones(rows, 8, dtype=torch.long),
              "completion_ids": torch.randint(0, v, (rows, tokens), generator=g),
              "completion_mask": mask, "advantages": torch.randn(rows, generator=g),
              "num_items_in_batch": mask.sum().float()}
    fn = (lambda m, x: trl.GRPOTrainer._compute_loss(tr, m, x)) if which == "trl" \
        else tr._compute_loss
    out = {}
    for step in ("warm-up", "measured"):
        peak = CpuPeak()
        t0 = time.perf_counter()
        peak.start()
        loss = fn(tr.model, inputs)
        loss.backward()
        out[step] = {"peak_growth_mib": peak.stop() / 2**20, "loss": float(loss),
                     "seconds": time.perf_counter() - t0}
    out.update(which=which, method=peak.method, mmap_threshold_pinned=pinned,
               vocab=v, hidden=tr.model.config.hidden_size, rows=rows, tokens=tokens,
               torch=torch.__version__, trl=trl.__version__)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--worker", choices=("trl", "ours"))
    p.add_argument("--model-dir")
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.tokens, a.rows, a.model_dir)))
        return
    sys.path[:0] = [str(ROOT)]
    from rankgrpo.model import build_tiny_model

    d = tempfile.mkdtemp()
    build_tiny_model(32000, seed=0, hidden_size=256, intermediate_size=512).save_pretrained(d)
    res = {}
    for which in ("trl", "ours"):
        r = subprocess.run([sys.executable, __file__, "--worker", which, "--model-dir", d,
                            "--tokens", str(a.tokens), "--rows", str(a.rows)],
                           capture_output=True, text=True, check=True)
        line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
        res[which] = json.loads(line[7:])
        print(line, flush=True)
    t, o = res["trl"]["measured"], res["ours"]["measured"]
    ratio = o["peak_growth_mib"] / t["peak_growth_mib"]
    print(f"loss step (loss + backward), V=32000 H=256, {a.rows} x {a.tokens} completion tokens, "
          f"fp32, CPU: peak memory growth TRL GRPOTrainer._compute_loss "
          f"{t['peak_growth_mib']:.1f} MiB, RankGRPOTrainer._compute_loss "
          f"{o['peak_growth_mib']:.1f} MiB (ratio {ratio:.3f});"
          f" loss {t['loss']:.8g} vs {o['loss']:.8g}; step {t['seconds']:.1f} s vs "
          f"{o['seconds']:.1f} s")


if __name__ == "__main__":
    main()
