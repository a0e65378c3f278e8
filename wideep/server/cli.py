"""`wideep serve MODEL_DIR [vLLM-style flags]`: the pod entrypoint (supervisor + per-rank engine/frontend)."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from wideep.server.args import add_serve_arguments

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible server: one HTTP port per local DP rank (port + i)",
        description="Starts one engine process and one HTTP frontend per local DP rank (rank i on --port + i) "
                    "and answers /health and /readyz for all of them on --data-parallel-supervisor-port.")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _serve(ns: argparse.Namespace) -> int:
    from wideep.server.args import serve_config_from_args
    from wideep.server.supervisor import run_supervisor

    try:
        cfg = serve_config_from_args(ns)
    except ValueError as e:
        print(f"wideep serve: error: {e}", file=sys.stderr)
        return 2
    return run_supervisor(cfg)
