"""The ``thinkfast`` command.

    thinkfast run      [--config FILE] [--force | --from STAGE] [key=value ...]   every stage, in order
    thinkfast STAGE    [--config FILE] [--force] [key=value ...]   one stage (pretrain, eval, ...)
    thinkfast eval     --model DIR [--out DIR] [key=value ...]     evaluate any model folder
    thinkfast convert  SRC DST [--overwrite]                        Llama folder -> nemotron-nas folder
    thinkfast report   RUN_DIR                                      RUN_DIR/report/report.md and its plots
    thinkfast ifgen    --prompts FILE --n N --out OUT [--field F] [--seed S] [--exclude IFEVAL]
                                                                    IFEval-style instruction prompts
    thinkfast gsm8k    [--source DATA] [--out DIR] [--seed S]          a real parent's recipe data from GSM8K

Without ``--config`` the embedded nano-world pipeline is used. Overrides are dotted keys into the YAML
(``pretrain.lr=1e-3``, ``run_dir=runs/x``). Every mistake is one line naming the file, key or value at
fault (exit 2; an environmental failure such as a full disk exits 1, Ctrl-C 130); ``--debug`` (or
``THINKFAST_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import hashlib
import os
import re
import sys
from pathlib import Path

from .config import ConfigError


def _add_config_args(p: argparse.ArgumentParser, what: str = "the stage") -> None:
    p.add_argument("--config", "-c", help="pipeline YAML (default: the embedded nano-world config)")
    p.add_argument("--force", action="store_true", help=f"redo {what} even if complete and current")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key, e.g. pretrain.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import STAGES

    parser = argparse.ArgumentParser(prog="thinkfast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every stage of the pipeline in order")
    _add_config_args(p, "every stage")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", choices=list(STAGES),
                   help="redo STAGE and every stage that depends on it (and nothing else)")
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage")
        _add_config_args(p)
        if name == "eval":
            p.add_argument("--model", help="evaluate this model folder instead of the pipeline's")
            p.add_argument("--out", help="with --model: where to write results (default runs/eval/PARENT-NAME-HASH of the model path)")
    p = sub.add_parser("convert", help="convert a Llama-layout checkpoint folder to nemotron-nas")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    p = sub.add_parser("serve", help="serve a model folder over an OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, help="a model folder (nemotron-nas or Llama layout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's positions)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the folder as given)")
    p.add_argument("--engine", choices=["continuous", "generate"], default="continuous",
                   help="continuous batching (default) or transformers' generate, one request at a time (baseline)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads of the engine (default: torch's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    p = sub.add_parser("ifgen", help="instruction-following prompts in IFEval's schema from your prompts")
    p.add_argument("--prompts", required=True, help="JSON lines; each row's --field is a source prompt")
    p.add_argument("--field", help="the prompt field (default: prompt, else question, else input)")
    p.add_argument("--keep", nargs="+", default=[], metavar="FIELD",
                   help="source fields copied into every row (e.g. answer, for a reward that reads it)")
    p.add_argument("--n", type=int, required=True, help="how many rows to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instructions", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                   help="instructions per prompt (default 1 3)")
    p.add_argument("--out", required=True, help="the JSON-lines file to write")
    p.add_argument("--exclude", help="skip sources matching these prompts (default: IFEval's test file if present)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    p = sub.add_parser("gsm8k", help="a real parent's recipe data (text, SFT pairs, RL and instruction prompts) "
                                     "from GSM8K train")
    p.add_argument("--source", default="../shared/data", help="the shared data folder (default ../shared/data)")
    p.add_argument("--out", default="data/gsm8k", help="where to write the files (default data/gsm8k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpo", type=int, default=1000, help="problems kept for GRPO's prompts (default 1000)")
    p.add_argument("--if-sources", type=int, default=1000, help="problems whose questions become instruction "
                   "prompts (default 1000)")
    p.add_argument("--if-prompts", type=int, default=2000, help="instruction prompts to write (default 2000)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    p = sub.add_parser("report", help="write RUN_DIR/report/report.md (what each stage cost and bought, plots)")
    p.add_argument("run_dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also THINKFAST_DEBUG=1)")
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _overrides_last(argv: list[str]) -> list[str]:
    """Let ``key=value`` overrides sit anywhere among the options (``thinkfast search a=1 --force b=2``):
    argparse takes positionals in one run, so they are moved after the options."""
    if not argv or argv[0] in ("convert", "report", "serve", "ifgen", "gsm8k"):
        return argv
    head, rest, overrides = argv[:1], [], []
    for i, a in enumerate(argv[1:]):
        prev = argv[i] if i else ""
        takes_value = prev in ("--config", "-c", "--from", "--model", "--out")
        (overrides if _OVERRIDE.match(a) and not takes_value else rest).append(a)
    return head + rest + overrides


def _error(message: str, code: int) -> int:
    print(f"thinkfast: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; every failure becomes one line on stderr and an exit code (2: a mistake in what was
    asked, 1: the environment or a bug, 130: interrupted)."""
    args = build_parser().parse_args(_overrides_last(sys.argv[1:] if argv is None else list(argv)))
    if args.debug or os.environ.get("THINKFAST_DEBUG", "") not in ("", "0"):
        return _dispatch(args)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("\nthinkfast: interrupted. Completed stages are kept; run the same command again (without "
              "--force) and the interrupted stage resumes from its last checkpoint.", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        return _error(str(e) if not isinstance(e, KeyError) else f"missing key {e}", 2)
    except PermissionError as e:
        return _error(f"permission denied: {e.filename or e}: make it writable or choose another run_dir", 1)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _error(f"no space left on the device writing {e.filename or 'the run directory'}: free some "
                          "space and run the same command again (completed stages are kept; nothing partial "
                          "is used)", 1)
        return _error(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)
    except MemoryError:
        return _error("out of memory: lower the batch size of the stage that was running", 1)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _error(f"{first} (rerun with --debug for the traceback)", 1)
    except Exception as e:  # noqa: BLE001 - a bug: still one line, with the way to the traceback
        return _error(f"internal error {type(e).__name__}: {e}. This is a bug in thinkfast: rerun with --debug "
                      "and report the traceback", 1)


def _dispatch(args) -> int:
    if args.command == "convert":
        from .artifacts import convert_checkpoint

        summary = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "serve":
        from .serving.server import serve

        serve(args.model, host=args.host, port=args.port, engine=args.engine, max_batch=args.max_batch,
              max_model_len=args.max_model_len, served_model_name=args.served_model_name, device=args.device,
              threads=args.threads)
        return 0
    if args.command == "report":
        from .report import write_report

        print(f"report: {write_report(args.run_dir)}")
        return 0
    if args.command == "ifgen":
        return _ifgen(args)
    if args.command == "gsm8k":
        from .tasks.gsm8k import write_recipe_data

        manifest = write_recipe_data(args.source, args.out, seed=args.seed, grpo=args.grpo,
                                     if_sources=args.if_sources, if_prompts=args.if_prompts)
        print(f"gsm8k: wrote {args.out}: " + ", ".join(f"{k} ({v} rows)" for k, v in manifest.items()
                                                         if isinstance(v, int)))
        return 0

    from .pipeline import load_pipeline, run_all, run_stage

    overrides = list(args.overrides)
    if args.command == "eval" and args.model:
        model = Path(args.model).resolve()
        # one results folder per model folder (two folders both named model/ must not share one)
        tag = hashlib.sha256(str(model).encode()).hexdigest()[:8]
        out = args.out or str(Path("runs") / "eval" / f"{model.parent.name}-{model.name}-{tag}")
        overrides += [f"eval.model={Path(args.model).resolve()}", f"run_dir={out}", "stages=[eval]"]
    pipe = load_pipeline(args.config, overrides)
    if args.command == "run":
        results = run_all(pipe, force=args.force, from_stage=args.from_stage)
        print(json.dumps({k: _headline(v) for k, v in results.items()}, indent=2))
        from .report import write_report

        try:  # the run's work is done and kept whatever happens here
            print(f"report: {write_report(pipe.run_dir)}")
        except Exception as e:  # noqa: BLE001
            print(f"thinkfast: warning: the report could not be written ({type(e).__name__}: {e}); "
                  f"`thinkfast report {pipe.run_dir}` retries", file=sys.stderr)
        return 0
    metrics, _ = run_stage(pipe, args.command, force=args.force)
    print(json.dumps(_headline(metrics), indent=2))
    return 0


def _ifgen(args) -> int:
    from .atomic import atomic_write_text
    from .tasks.instructions import generate_if_prompts, ifeval_test_file, ifeval_test_prompts, read_prompt_texts

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    texts, extra = read_prompt_texts(args.prompts, args.field, args.keep), None
    if args.keep:
        texts, extra = texts
    exclude_path = args.exclude or (ifeval_test_file() if ifeval_test_file().is_file() else None)
    exclude = ifeval_test_prompts(exclude_path) if exclude_path else set()
    stats: dict = {}
    rows = generate_if_prompts(texts, args.n, seed=args.seed, instructions=tuple(args.instructions),
                               exclude=exclude, stats=stats, extra=extra)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"ifgen: wrote {len(rows)} rows to {args.out} from {len(texts)} sources; excluded {stats['excluded']} "
          f"matching {exclude_path or 'no test set'}" + (f", {stats['empty']} empty" if stats["empty"] else ""))
    return 0


def _headline(metrics: dict, prefix: str = "") -> dict:
    """Scalars only (an eval's per-cell tables are in its metrics.json and table.txt files)."""
    out = {prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for mode, m in metrics.get("modes", {}).items():
        out.update({f"{prefix}{mode}.{k}": v for k, v in m.items() if k != "cells"})
    for name, m in metrics.get("models", {}).items():
        out.update(_headline(m, f"{prefix}{name}."))
    return out


if __name__ == "__main__":
    sys.exit(main())
