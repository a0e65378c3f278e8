"""`wideep bench`: inference-perf-compatible benchmark runs, comparisons, and stack-up-and-measure.

  wideep bench -c workload.yaml [-o DIR] [--base-url URL] [--tokenizer DIR] [--workload NAME]
  wideep bench -c a.yaml -c b.yaml -o DIR          two configs, then a side-by-side comparison
  wideep bench -c w.yaml --target URL1 --target URL2 -o DIR   one config against two servers
  wideep bench --stack deploy.yaml -c w.yaml -o DIR           start the stack, measure, stop it
  wideep bench compare RUN_A RUN_B [-o DIR]         compare two finished run directories
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server (inference-perf config format)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="inference-perf config or llm-d run_only.sh template (repeat to compare two configs)")
    p.add_argument("--workload", help="pick one entry of a template's workload: section (default: all)")
    p.add_argument("-o", "--output", help="report directory (default: storage.local_storage.path)")
    p.add_argument("--base-url", help="override server.base_url")
    p.add_argument("--target", action="append", default=[], metavar="URL",
                   help="run the config against each target (repeat to compare two servers)")
    p.add_argument("--model", help="override server.model_name")
    p.add_argument("--tokenizer", help="local directory with tokenizer.json (overrides tokenizer.*)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs serving the stack, for output tokens/s per GPU")
    p.add_argument("--label", action="append", default=[], help="label of each run in tables and plots")
    p.add_argument("--seed", type=int, help="seed for prompts and arrivals (default: load.base_seed or the clock)")
    p.add_argument("--no-progress", action="store_true", help="no live display (also off when stdout is not a TTY)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--stack", metavar="SPEC",
                   help="start `wideep up -f SPEC` (SPEC 'default': the embedded tiny CPU stack), benchmark it, stop it")
    p.add_argument("--stack-timeout", type=float, default=900.0, help="seconds to wait for the stack to be ready")
    p.add_argument("--stack-args", default="", metavar="ARGS",
                   help="extra arguments for `wideep up`, one string (e.g. \"--router-port 9000 --port-base 31000\")")
    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    sub.required = False
    c = sub.add_parser("compare", help="put finished runs side by side (table + overlaid plots)")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("-o", "--output", dest="compare_output", default="bench-compare", help="where to write plots/CSV")
    c.add_argument("--label", dest="compare_labels", action="append", default=[], help="label per run")
    p.set_defaults(func=main)


def main(args) -> int:

    from .config import ConfigError, load_workloads

    if args.bench_command == "compare":
        from .compare import compare_runs

        if len(args.runs) < 2:
            print("wideep bench compare: give at least two run directories", file=sys.stderr)
            return 2
        try:
            compare_runs(args.runs, args.compare_output, args.compare_labels or None)
        except FileNotFoundError as exc:
            print(f"wideep bench compare: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        print("wideep bench: -c/--config is required (or `wideep bench compare RUN_A RUN_B`)", file=sys.stderr)
        return 2
    try:
        plan = _plan(args, load_workloads)
    except (ConfigError, OSError) as exc:
        print(f"wideep bench: {exc}", file=sys.stderr)
        return 2
    try:
        if args.stack:
            from .stack import Stack

            import shlex

            with Stack(args.stack, args.base_url, args.stack_timeout, extra_args=tuple(shlex.split(args.stack_args))) as stack:
                for item in plan:
                    item["opts"].base_url = item["opts"].base_url or stack.base_url
                return _run_plan(plan, args)
        return _run_plan(plan, args)
    except ConfigError as exc:
        print(f"wideep bench: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .stack import StackError

        if not isinstance(exc, StackError):
            raise
        print(f"wideep bench: the stack did not come up: {exc}", file=sys.stderr)
        return 1


def _plan(args, load_workloads) -> list[dict]:
    """(config, options) per run: every workload of every -c, times every --target."""
    from pathlib import Path

    from .runner import RunOptions

    runs = []
    for path in args.config:
        for name, cfg in load_workloads(path, args.workload).items():
            for target in args.target or [args.base_url]:
                runs.append({"name": name, "cfg": cfg, "target": target})
    multi = len(runs) > 1
    base = Path(args.output) if args.output else None
    for i, run in enumerate(runs):
        label = args.label[i] if i < len(args.label) else (
            f"{run['name']}@{run['target']}" if len(args.target) > 1 else run["name"])
        if multi and len({r["name"] for r in runs}) < len(runs):
            label = args.label[i] if i < len(args.label) else f"{label}-{i}"
        out = None
        if base is not None:
            out = str(base / _safe(label)) if multi else str(base)
        run["opts"] = RunOptions(base_url=run["target"], model=args.model, tokenizer=args.tokenizer, output=out,
                                 progress=not args.no_progress, plots=not args.no_plots, gpus=args.gpus,
                                 label=label, seed=args.seed)
    return runs


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _run_plan(plan: list[dict], args) -> int:
    from pathlib import Path

    from .runner import run_benchmark

    outs = [run_benchmark(item["cfg"], item["opts"], item["name"]) for item in plan]
    if len(outs) > 1:
        from .compare import compare_runs

        base = Path(args.output) if args.output else outs[0].parent
        compare_runs(outs, base / "compare", [item["opts"].label for item in plan])
    return 0
