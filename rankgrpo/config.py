"""Configuration: one dataclass per section, YAML files, `key=value` command-line overrides.

A config file has up to five sections, each a dataclass below:

    model:  which network and tokenizer to load            (ModelConfig)
    data:   records, catalog, list length                   (DataConfig)
    sft:    stage 1, supervised fine-tuning                 (SFTConfig)
    grpo:   stage 2, Rank-GRPO / GRPO / GSPO                (GRPOConfig)
    eval:   held-out evaluation                             (EvalConfig)

Option names follow TRL's GRPOConfig / SFTConfig where the concept is the same. Defaults of
`grpo` and `sft` are the paper's (docs/math.md section 11); the per-model presets in
`rankgrpo/configs/` set the rest.

Loading is strict: an unknown key, a value of the wrong type or out of range, or a missing
required key raises `ConfigError` naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankgrpo_kernels import BACKENDS, LEVELS, LOSS_TYPE_TABLE, LOSS_TYPES, check_delta

from .rewards import REWARD_KINDS

SECTIONS = ("model", "data", "sft", "grpo", "eval")
SCALES = ("group", "batch", "none")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "multistep")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SEGMENT_MODES = ("newline", "aligned")
LONG_PROMPTS = ("error", "skip")
REPORTERS = ("jsonl", "tensorboard")
IDEAL_MODES = ("groundtruth", "surviving")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    """The policy network and its tokenizer."""

    model_name_or_path: str | None = None  # local folder or hub id (required unless `tiny`)
    gguf_file: str | None = None  # a .gguf file inside model_name_or_path (e.g. SmolLM2)
    tokenizer_name_or_path: str | None = None  # default: model_name_or_path
    tiny: dict | None = None  # Qwen2Config keywords: a random tiny model (tests, demos)
    dtype: str = "float32"  # storage dtype of the trained weights ("auto": the checkpoint's)
    attn_implementation: str = "auto"  # flash_attention_2 when importable on CUDA, else sdpa
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Records (docs/math.md section 12) and the catalog."""

    train_file: str | None = None  # JSONL records or a `save_to_disk` folder
    eval_file: str | None = None
    catalog: str = "reddit_v2"  # a shipped catalog name or a catalog file
    num_ranks: int = 20  # N, items per list
    year_tolerance: int = 2
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class _Loop:
    """Options shared by both training stages."""

    output_dir: str = "runs/run"
    seed: int = 42
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "constant"
    lr_milestones: list[int] = field(default_factory=list)  # multistep: steps where lr drops
    lr_gamma: float = 0.1  # multistep: factor at each milestone
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    bf16: bool = False  # bf16 autocast, fp32 master weights (accelerate mixed precision)
    kernel_backend: str = "auto"
    logging_steps: int = 1
    save_steps: int = 50  # 0: only at the end and on Ctrl-C / errors
    save_total_limit: int | None = 2
    eval_steps: int = 0  # 0: no periodic held-out evaluation
    eval_on_start: bool = False  # evaluate once before the first step
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    disable_tqdm: bool = False
    skip_nonfinite_steps: int = 0  # steps a run may skip for a NaN/inf loss or gradient


@dataclass
class SFTConfig(_Loop):
    """Stage 1: completion-only supervised fine-tuning (paper: lr 5e-5 cosine, 5% warmup,
    10 epochs)."""

    output_dir: str = "runs/sft"
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    adam_beta2: float = 0.999
    num_train_epochs: float = 10.0
    max_length: int = 3072  # prompt + completion tokens
    completion_only_loss: bool = True
    long_prompts: str = "error"  # "skip": drop (and count) examples longer than max_length


@dataclass
class GRPOConfig(_Loop):
    """Stage 2: Rank-GRPO (default), vanilla GRPO (reward_kind=sequence_dcg,
    importance_sampling_level=token) or GSPO (importance_sampling_level=sequence).

    A step consumes per_device_train_batch_size x gradient_accumulation_steps x processes
    completions (paper: 384 = 48 prompts x num_generations 8) and makes num_iterations
    optimizer steps on them.
    """

    output_dir: str = "runs/grpo"
    init_from: str | None = None  # start policy and reference here (e.g. the SFT output)
    num_generations: int = 8
    max_prompt_length: int = 2048
    max_completion_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    generation_batch_size: int | None = None  # completions per generate call (None: all)
    num_train_epochs: float = 2.0
    num_iterations: int = 1
    epsilon: float = 0.06  # epsilon_low
    epsilon_high: float = 0.08
    delta: float | None = None
    beta: float = 1e-3
    # one of rankgrpo_kernels.LOSS_TYPES (docs/math.md sections 7 and 7.1); for "cispo",
    # epsilon_high is the cap on the ratio itself (TRL recommends 5.0), not 1 + epsilon_high
    loss_type: str = "bnpo"
    importance_sampling_level: str = "rank"
    reward_kind: str = "exp_inf"
    reward_gamma: float | None = None  # Gamma of reward_kind=exp_gamma
    scale_rewards: str = "group"
    segment_mode: str = "newline"  # "aligned": tokens follow the parsed items
    overflow_penalty: float = -0.1
    short_eos_penalty: float = -0.1
    exact_eos_bonus: float = 0.1
    mask_truncated_completions: bool = False
    long_prompts: str = "error"  # "skip": drop (and count) records over max_prompt_length


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy decoding, one generation per unique prompt."""

    batch_size: int = 16
    max_new_tokens: int = 1024
    max_prompt_length: int = 2048
    ks: list[int] = field(default_factory=lambda: [5, 10, 15, 20])
    ideal: str = "groundtruth"  # IDCG from min(|GT|, K); "surviving": the released code's cap
    output_file: str | None = None  # write per-record generations and metrics (JSONL)
    long_prompts: str = "skip"
    disable_tqdm: bool = False  # `rankgrpo eval`'s progress bar


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, command: str | None = None) -> Config:
        """Check every value; `command` ("sft", "train", "eval") adds its required keys."""
        validate_section("model", self.model)
        validate_section("data", self.data)
        validate_section("sft", self.sft)
        validate_section("grpo", self.grpo)
        validate_section("eval", self.eval)
        if self.model.model_name_or_path is None and self.model.tiny is None:
            raise ConfigError("config is missing required key 'model.model_name_or_path' "
                              "(a local model folder or hub id; or 'model.tiny' for a random "
                              "tiny model)")
        if self.model.tiny is not None and self.model.tokenizer_name_or_path is None \
                and self.model.model_name_or_path is None:
            raise ConfigError("'model.tiny' needs 'model.tokenizer_name_or_path' (a saved "
                              "tokenizer folder)")
        if command in ("sft", "train") and self.data.train_file is None:
            raise ConfigError(f"`rankgrpo {command}` needs required key 'data.train_file' "
                              "(JSONL records or a save_to_disk folder)")
        if command == "eval" and self.data.eval_file is None:
            raise ConfigError("`rankgrpo eval` needs required key 'data.eval_file'")
        return self


# ----------------------------------------------------------------------------- validation

def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def _choice(key, value, choices):
    if value not in choices:
        _fail(key, value, f"one of {list(choices)}")


def _positive(key, value, allow_zero=False):
    if value is None or (value < 0 if allow_zero else value <= 0):
        _fail(key, value, ">= 0" if allow_zero else "> 0")


def validate_section(name: str, cfg: Any) -> None:
    """Range and choice checks of one section (types were checked when loading)."""
    k = lambda key: f"{name}.{key}"  # noqa: E731
    for f in dataclasses.fields(cfg):  # inf or NaN anywhere would train into NaN weights
        v = getattr(cfg, f.name)
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, float) and not math.isfinite(x):
                _fail(k(f.name) + (f"[{i}]" if isinstance(v, list) else ""), x,
                      "a finite number")
    if isinstance(cfg, ModelConfig):
        _choice(k("dtype"), cfg.dtype, DTYPES)
        return
    if isinstance(cfg, DataConfig):
        _positive(k("num_ranks"), cfg.num_ranks)
        _positive(k("year_tolerance"), cfg.year_tolerance, allow_zero=True)
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(cfg, key) is not None:
                _positive(k(key), getattr(cfg, key))
        return
    if isinstance(cfg, EvalConfig):
        _positive(k("batch_size"), cfg.batch_size)
        _positive(k("max_new_tokens"), cfg.max_new_tokens)
        _positive(k("max_prompt_length"), cfg.max_prompt_length)
        _choice(k("ideal"), cfg.ideal, IDEAL_MODES)
        _choice(k("long_prompts"), cfg.long_prompts, LONG_PROMPTS)
        if not cfg.ks or any(x < 1 for x in cfg.ks):
            _fail(k("ks"), cfg.ks, "a non-empty list of ints >= 1")
        return
    # the training loops
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                "learning_rate", "adam_epsilon"):
        _positive(k(key), getattr(cfg, key))
    for key in ("save_steps", "eval_steps", "warmup_steps", "weight_decay", "num_train_epochs"):
        _positive(k(key), getattr(cfg, key), allow_zero=True)
    if not 0 <= cfg.warmup_ratio < 1:
        _fail(k("warmup_ratio"), cfg.warmup_ratio, "in [0, 1)")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            _fail(k(key), getattr(cfg, key), "in [0, 1)")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        _fail(k("max_steps"), cfg.max_steps, "-1 (use num_train_epochs) or >= 1")
    if cfg.max_steps == -1 and cfg.num_train_epochs <= 0:
        _fail(k("num_train_epochs"), cfg.num_train_epochs, "> 0 when max_steps is -1")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        _fail(k("save_total_limit"), cfg.save_total_limit, "None or >= 1")
    _choice(k("lr_scheduler_type"), cfg.lr_scheduler_type, SCHEDULERS)
    _choice(k("kernel_backend"), cfg.kernel_backend, BACKENDS)
    _positive(k("lr_gamma"), cfg.lr_gamma)
    _positive(k("skip_nonfinite_steps"), cfg.skip_nonfinite_steps, allow_zero=True)
    if sorted(cfg.lr_milestones) != list(cfg.lr_milestones) or any(
            m < 1 for m in cfg.lr_milestones):
        _fail(k("lr_milestones"), cfg.lr_milestones, "increasing steps >= 1")
    for r in cfg.report_to:
        _choice(k("report_to"), r, REPORTERS)
    _choice(k("long_prompts"), cfg.long_prompts, LONG_PROMPTS)
    if isinstance(cfg, SFTConfig):
        _positive(k("max_length"), cfg.max_length)
        return
    assert isinstance(cfg, GRPOConfig)
    if cfg.num_generations < 2:
        _fail(k("num_generations"), cfg.num_generations,
              ">= 2 (group advantages compare completions of the same prompt)")
    for key in ("max_prompt_length", "max_completion_length", "temperature", "top_p",
                "num_iterations"):
        _positive(k(key), getattr(cfg, key))
    if cfg.top_p > 1:
        _fail(k("top_p"), cfg.top_p, "in (0, 1]")
    _positive(k("top_k"), cfg.top_k, allow_zero=True)
    if cfg.generation_batch_size is not None:
        _positive(k("generation_batch_size"), cfg.generation_batch_size)
    for key in ("epsilon", "epsilon_high", "beta"):
        _positive(k(key), getattr(cfg, key), allow_zero=True)
    try:  # the kernel package owns the range of delta
        check_delta(cfg.delta, f"config key '{k('delta')}'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _choice(k("loss_type"), cfg.loss_type, LOSS_TYPES)
    if cfg.kernel_backend == "native" and LOSS_TYPE_TABLE[cfg.loss_type][1] != "clip":
        _fail(k("loss_type"), cfg.loss_type, "a loss type of the plain clip surrogate with "
              "kernel_backend=native (its op library lacks the others; 'auto' picks torch's "
              "stage for them)")
    _choice(k("importance_sampling_level"), cfg.importance_sampling_level, LEVELS)
    _choice(k("reward_kind"), cfg.reward_kind, REWARD_KINDS)
    if cfg.reward_kind == "exp_gamma" and (cfg.reward_gamma is None or cfg.reward_gamma <= 1):
        _fail(k("reward_gamma"), cfg.reward_gamma, "> 1 with reward_kind=exp_gamma")
    _choice(k("scale_rewards"), cfg.scale_rewards, SCALES)
    _choice(k("segment_mode"), cfg.segment_mode, SEGMENT_MODES)


# ----------------------------------------------------------------------------- loading

_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "sft": SFTConfig,
                  "grpo": GRPOConfig, "eval": EvalConfig}
COMMAND_SECTION = {"sft": "sft", "train": "grpo", "eval": "eval"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    base, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")
                         and base is not str):
        if optional:
            return None
        _fail(key, value, f"a value of type {getattr(base, '__name__', base)} (not null)")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        _fail(key, value, "true or false")
    if base is int:
        if isinstance(value, bool):
            _fail(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(key, value, "an integer")
    if base is float:
        if isinstance(value, bool):
            _fail(key, value, "a number")
        if isinstance(value, (int, float)):
            v = float(value)
        else:
            try:  # PyYAML reads 1e-6 (no dot) as a string
                v = float(str(value))
            except ValueError:
                _fail(key, value, "a number")
        if math.isnan(v):
            _fail(key, value, "a number (not NaN)")
        return v
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(key, value, "a string")
    origin = typing.get_origin(base)
    if origin is list:
        (item_tp,) = typing.get_args(base)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "a list")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if base is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "a mapping")
        return dict(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # pragma: no cover


def _apply(section_obj: Any, section: str, values: dict, source: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got "
                          f"{type(values).__name__}")
    hints = _field_types(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            near = _suggest(key, hints)
            raise ConfigError(f"{source}: unknown config key '{section}.{key}'{near}")
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _suggest(key: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge_dict(cfg: Config, raw: dict, source: str = "config") -> Config:
    """Apply a nested mapping {section: {key: value}} onto `cfg` (in place)."""
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"{list(SECTIONS)}, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section '{section}'"
                              f"{_suggest(str(section), SECTIONS)}; sections are "
                              f"{list(SECTIONS)}")
        _apply(getattr(cfg, section), section, values or {}, source)
    return cfg


def preset_path(name: str) -> Path:
    """A preset shipped in rankgrpo/configs (name with or without .yaml), or a file path."""
    p = Path(name)
    if p.exists():
        return p
    shipped = Path(__file__).parent / "configs" / (name if name.endswith(".yaml")
                                                  else f"{name}.yaml")
    if shipped.exists():
        return shipped
    raise ConfigError(f"config file {name!r} not found (neither a path nor a preset in "
                      f"{shipped.parent}: {sorted(x.stem for x in shipped.parent.glob('*.yaml'))})")


def parse_override(item: str, command: str | None = None) -> tuple[str, str, Any]:
    """'grpo.beta=0' -> ("grpo", "beta", 0). An unqualified key goes to the command's
    section (sft, grpo or eval), else to model/data when exactly one of them has it."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section '{section}'; sections are "
                              f"{list(SECTIONS)}")
        return section, name, value
    candidates = []
    if command in COMMAND_SECTION:
        candidates.append(COMMAND_SECTION[command])
    for s in candidates:
        if key in _field_types(_SECTION_TYPES[s]):
            return s, key, value
    owners = [s for s in ("model", "data") if key in _field_types(_SECTION_TYPES[s])]
    if len(owners) == 1:
        return owners[0], key, value
    every = [s for s in SECTIONS if key in _field_types(_SECTION_TYPES[s])]
    if not every:
        names = set().union(*(_field_types(c) for c in _SECTION_TYPES.values()))
        raise ConfigError(f"override {item!r}: unknown config key '{key}'"
                          f"{_suggest(key, names)}")
    raise ConfigError(f"override {item!r}: '{key}' exists in sections {every}; write "
                      f"'{every[0]}.{key}=...'")


def load_config(paths: str | os.PathLike | list | tuple | None = None,
                overrides: list[str] | tuple[str, ...] = (), *,
                command: str | None = None, validate: bool = True) -> Config:
    """Defaults <- each YAML file in order <- `key=value` overrides; then validate.

    Args:
        paths: one or more YAML files or shipped preset names (later ones win).
        overrides: "section.key=value" strings (values parsed as YAML).
        command: "sft", "train" or "eval": resolves unqualified overrides and adds the
            command's required keys to the validation.
    """
    cfg = Config()
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        path = preset_path(str(p))
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        merge_dict(cfg, raw or {}, source=str(path))
    for item in overrides:
        section, key, value = parse_override(item, command)
        _apply(getattr(cfg, section), section, {key: value}, source=f"override {item!r}")
    if validate:
        cfg.validate(command)
    return cfg


def replace(section_obj, **changes):
    """dataclasses.replace with the same type and range checks as loading."""
    name = next((s for s, c in _SECTION_TYPES.items() if type(section_obj) is c), "config")
    new = dataclasses.replace(section_obj)
    _apply(new, name, changes, source="replace")
    validate_section(name, new)
    return new


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
