"""The ``thinkfast`` command.

    thinkfast run      [--config FILE] [--force] [key=value ...]   every stage of the pipeline, in order
    thinkfast STAGE    [--config FILE] [--force] [key=value ...]   one stage (pretrain, eval, ...)
    thinkfast eval     --model DIR [--out DIR] [key=value ...]     evaluate any model folder
    thinkfast convert  SRC DST [--overwrite]                        Llama folder -> nemotron-nas folder

Without ``--config`` the embedded nano-world pipeline is used. Overrides are dotted keys into the YAML
(``pretrain.lr=1e-3``, ``run_dir=runs/x``). Errors in configs name the file, line and key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="pipeline YAML (default: the embedded nano-world config)")
    p.add_argument("--force", action="store_true", help="redo completed stages")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key, e.g. pretrain.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import STAGES

    parser = argparse.ArgumentParser(prog="thinkfast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_args(sub.add_parser("run", help="run every stage of the pipeline in order"))
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        _add_config_args(p)
        if name == "eval":
            p.add_argument("--model", help="evaluate this model folder instead of the pipeline's")
            p.add_argument("--out", help="with --model: where to write results (default runs/eval/<name>)")
    p = sub.add_parser("convert", help="convert a Llama-layout checkpoint folder to nemotron-nas")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"thinkfast: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "convert":
        from .convert import convert_checkpoint

        summary = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return 0

    from .pipeline import load_pipeline, run_all, run_stage

    overrides = list(args.overrides)
    if args.command == "eval" and args.model:
        out = args.out or str(Path("runs") / "eval" / Path(args.model).resolve().name)
        overrides += [f"eval.model={Path(args.model).resolve()}", f"run_dir={out}", "stages=[eval]"]
    pipe = load_pipeline(args.config, overrides)
    if args.command == "run":
        results = run_all(pipe, force=args.force)
        print(json.dumps({k: _headline(v) for k, v in results.items()}, indent=2))
        return 0
    metrics, _ = run_stage(pipe, args.command, force=args.force)
    print(json.dumps(_headline(metrics), indent=2))
    return 0


def _headline(metrics: dict) -> dict:
    """Scalars only (an eval's per-cell table is in its metrics.json and table.txt)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for mode, m in metrics.get("modes", {}).items():
        out.update({f"{mode}.{k}": v for k, v in m.items() if k != "cells"})
    return out


if __name__ == "__main__":
    sys.exit(main())
