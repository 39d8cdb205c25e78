"""rankgrpo: the trainer around `rankgrpo_kernels` (the math: docs/math.md; the design:
docs/design.md). Importing the package imports nothing heavy; each module below does.

Data and rewards (docs/math.md sections 1-3, 10, 12)
    prompts      the paper's prompt and conversation transcripts
    records      Reddit-v2 records: read, write, validate
    catalog      item catalogs and the exact (title, year) membership test
    redial       ReDial -> records, split by dialogue (the shipped data)
    synthetic    the synthetic world of the CPU demo
    parsing      generated text -> (title, year) items
    rewards      relevance, rank rewards (exp_inf, log, exp_gamma), sequence DCG, one DCG
    metrics      Recall@K, NDCG@K and list diagnostics
    teacher      a co-occurrence recommender that writes SFT targets

Tokens and the RL step (sections 4-7; the loss itself is in rankgrpo_kernels)
    tokens       the per-tokenizer newline table, decoding with character offsets
    alignment    aligned mode: segment ids that follow the parsed items
    shaping      re-exports the kernel package's per-token advantage rule
    rollout      the `Rollout` protocol and Hugging Face generate
    rl_step      score -> group advantages -> batch -> old/ref log-probs -> loss per micro-batch
    backward     the one micro-batch backward loop of both stages

Training
    config       dataclass sections, YAML presets (configs/), key=value overrides
    model        loading models (folder, hub id, GGUF, tiny), hidden states and the LM head
    encoding     records -> token ids with length checks
    optim        AdamW and the learning-rate schedules
    sampler      a resumable, seeded data order
    sft          stage 1 SFT (on RRA or teacher data)
    train        stage 2 Rank-GRPO / GRPO / GSPO
    runtime      the shared loop: trainer state, logging, evaluation, checkpoints, signals
    checkpoint   atomic checkpoints, exact resume, damaged-checkpoint fallback
    run_log      metrics.jsonl, TensorBoard, progress bars
    evaluate     held-out greedy evaluation
    fileio       atomic writes, gzip-aware text
    cli          the `rankgrpo` console script (sft, train, eval, demo, rra)
    demo         `rankgrpo demo`

Subpackages
    rra          stage 1, Remap-Reflect-Adjust (docs/rra/README.md)
    integrations Rank-GRPO in TRL and verl (docs/integrations.md)
    tiny         a tiny in-process tokenizer and model for tests and demos
"""
