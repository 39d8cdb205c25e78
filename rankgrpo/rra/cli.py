"""`rankgrpo rra`: Stage 1, Remap-Reflect-Adjust (also `python -m rankgrpo.rra.cli`).

    rankgrpo rra [--config FILE ...] [--print-config] [key=value ...]

A config file has one section, `rra:` (see `rankgrpo.rra.config.RRAConfig`); overrides are
`key=value` or `rra.key=value`. Defaults: SmolLM2-135M-Instruct (offline GGUF) as the
teacher on the shipped ReDial train split, all-MiniLM-L6-v2 as the embedder, the ablation on
the shipped test split. Rerunning with the same output_dir resumes: cached teacher answers
are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import ConfigError
from .config import dump_rra_config, load_rra_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rankgrpo rra", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", action="append", default=[],
                   help="YAML file with an rra: section (repeatable; later ones win)")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_rra_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rankgrpo rra: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_rra_config(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ..records import RecordError
    from .embed import EmbedderError
    from .pipeline import RRAError, run_rra
    from .teacher import TeacherError

    try:
        manifest = run_rra(cfg)
    except (RRAError, EmbedderError, TeacherError, RecordError, ConfigError,
            FileNotFoundError) as e:
        print(f"rankgrpo rra: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("output", "train", "seconds") if k in manifest}
    for k in ("adjust", "reflect_skipped"):
        if k in manifest:
            summary[k] = manifest[k]
    if "eval" in manifest:
        summary["ablation"] = manifest["eval"]["ablation"]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
