"""Config loading: presets, strict keys, types, overrides, and errors that name the key."""

import pytest

from rankgrpo.cli import main as cli_main
from rankgrpo.config import (
    Config,
    ConfigError,
    GRPOConfig,
    load_config,
    parse_override,
    preset_path,
    replace,
)

PRESETS = ["qwen2.5-0.5b-instruct", "llama-3.2-1b-instruct", "llama-3.2-3b-instruct",
           "smollm2-135m-instruct"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_have_paper_values(name):
    cfg = load_config(name, ["data.train_file=x.jsonl"], command="train")
    g = cfg.grpo
    assert (g.adam_beta1, g.adam_beta2, g.max_grad_norm) == (0.9, 0.99, 1.0)
    assert (g.epsilon, g.epsilon_high, g.beta) == (0.06, 0.08, 1e-3)
    assert g.importance_sampling_level == "rank" and g.reward_kind == "exp_inf"
    if "smollm2" not in name:
        assert g.per_device_train_batch_size * g.gradient_accumulation_steps * 8 == 384
        assert g.num_generations == 8 and g.learning_rate == 1e-6
        assert (g.max_prompt_length, g.max_completion_length) == (2048, 1024)
        assert cfg.sft.learning_rate == 5e-5 and cfg.sft.lr_scheduler_type == "cosine"
        assert cfg.sft.warmup_ratio == 0.05 and cfg.sft.num_train_epochs == 10
    if "llama" in name:
        assert g.lr_scheduler_type == "multistep" and g.lr_milestones == [8000]


def test_algorithm_overlays_merge_in_order():
    cfg = load_config(["qwen2.5-0.5b-instruct", "algo-grpo"], ["data.train_file=x"],
                      command="train")
    assert cfg.grpo.reward_kind == "sequence_dcg"
    assert cfg.grpo.importance_sampling_level == "token"
    assert (cfg.grpo.epsilon, cfg.grpo.epsilon_high) == (0.2, 0.26)
    assert cfg.grpo.learning_rate == 1e-6  # from the first file
    gspo = load_config(["qwen2.5-0.5b-instruct", "algo-gspo"], command=None)
    assert gspo.grpo.importance_sampling_level == "sequence" and gspo.grpo.epsilon == 3e-4


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  model_name_or_path: m\ngrpo:\n  num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"grpo\.num_generation.*did you mean "
                                          r"'num_generations'"):
        load_config(p)
    p.write_text("modle:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        load_config(p)


def test_missing_required_keys_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  beta: 0.0\n")
    with pytest.raises(ConfigError, match=r"missing required key 'model\.model_name_or_path'"):
        load_config(p, command="train")
    p.write_text("model:\n  model_name_or_path: m\n")
    with pytest.raises(ConfigError, match=r"data\.train_file"):
        load_config(p, command="train")
    with pytest.raises(ConfigError, match=r"data\.eval_file"):
        load_config(p, command="eval")


def test_types_and_ranges(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  model_name_or_path: m\ngrpo:\n  learning_rate: 1e-6\n"
                 "  max_steps: 3\n")
    cfg = load_config(p)  # PyYAML reads 1e-6 as a string; it must become a float
    assert cfg.grpo.learning_rate == 1e-6 and isinstance(cfg.grpo.learning_rate, float)
    bad = {"grpo.learning_rate=abc": "a number", "grpo.loss_type=foo": "one of",
           "grpo.num_generations=1": ">= 2", "grpo.max_steps=2.5": "an integer",
           "grpo.top_p=1.5": r"\(0, 1\]", "grpo.bf16=maybe": "true or false",
           "grpo.reward_kind=exp_gamma": "reward_gamma",
           "grpo.use_vllm=true": "unknown config key",  # removed: a rollout is a `Rollout`
           "eval.ks=[]": "non-empty", "model.dtype=int8": "one of"}
    for item, msg in bad.items():
        key = item.split("=")[0]
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(p, [item])
        assert key.split(".")[1] in str(e.value)


def test_overrides_resolve_sections():
    assert parse_override("beta=0", "train")[:2] == ("grpo", "beta")
    assert parse_override("learning_rate=1e-5", "sft")[:2] == ("sft", "learning_rate")
    assert parse_override("dtype=bfloat16", "train")[:2] == ("model", "dtype")
    assert parse_override("num_ranks=10", "train")[:2] == ("data", "num_ranks")
    with pytest.raises(ConfigError, match="exists in sections"):
        parse_override("learning_rate=1", None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("beta", "train")
    with pytest.raises(ConfigError, match="unknown config key 'betta'"):
        parse_override("betta=1", "train")
    cfg = load_config(None, ["model.model_name_or_path=m", "eval.ks=5,10",
                             "grpo.lr_milestones=[10, 20]", "grpo.delta=null"])
    assert cfg.eval.ks == [5, 10] and cfg.grpo.lr_milestones == [10, 20]
    assert cfg.grpo.delta is None


def test_replace_checks_values():
    g = replace(GRPOConfig(), beta=0.0, learning_rate="2e-6")
    assert g.beta == 0.0 and g.learning_rate == 2e-6
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        replace(GRPOConfig(), loss_type="nope")
    with pytest.raises(ConfigError, match="unknown config key 'grpo.nope'"):
        replace(GRPOConfig(), nope=1)


def test_defaults_are_the_paper_code():
    g = Config().grpo
    assert (g.loss_type, g.scale_rewards, g.num_iterations, g.temperature, g.top_p) == (
        "bnpo", "group", 1, 1.0, 1.0)
    assert (g.overflow_penalty, g.short_eos_penalty, g.exact_eos_bonus) == (-0.1, -0.1, 0.1)


def test_cli_reports_config_errors(capsys, tmp_path):
    assert cli_main(["train", "--config", "qwen2.5-0.5b-instruct"]) == 2
    assert "data.train_file" in capsys.readouterr().err
    assert cli_main(["train", "--config", "qwen2.5-0.5b-instruct", "data.train_file=x",
                     "grpo.epsilonn=1"]) == 2
    assert "epsilonn" in capsys.readouterr().err
    assert cli_main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["train", "--config", "qwen2.5-0.5b-instruct", "--print-config",
                     "data.train_file=x", "beta=0"]) == 0
    assert "beta: 0.0" in capsys.readouterr().out


def test_preset_path_lists_presets():
    with pytest.raises(ConfigError, match="qwen2.5-0.5b-instruct"):
        preset_path("no-such-preset")
