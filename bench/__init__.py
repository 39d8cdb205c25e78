"""rankgrpo benchmarks: the fused Rank-GRPO loss against its peers, same inputs, same run.

    python -m bench --suite smoke      # CPU, seconds (CI)
    python -m bench --suite cpu        # torch backend vs reference on CPU, own processes
    python -m bench --suite standard   # GPU: Qwen2.5-0.5B / Llama-3.2-3B / Qwen2.5-7B heads
    bash bench/gpu_check.sh [OUT_DIR]  # the one script for a GPU machine without network

Modules: suites (what runs), inputs (the rollout-shaped batch), contenders (ours and the
peers), timing and memory (how it is measured), flops (FLOP counts, matmul rate), runner
(one loop over shapes and T; in-process or one process per measurement), worker (one
isolated measurement), report (progress lines, JSON, markdown, optional plots, the cpu
summary, targets; refuses absolute paths).
"""
