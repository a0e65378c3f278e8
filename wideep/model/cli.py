"""`wideep make-model {tiny,layer-slice}`: write a synthetic DeepSeek-V3 checkpoint (see make_model.py)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="write a synthetic DeepSeek-V3 checkpoint (HF format)")
    p.add_argument("preset", choices=["tiny", "layer-slice"])
    p.add_argument("--out", default=None, help="output directory (default: models/<preset>)")
    p.add_argument("--num-moe-layers", type=int, default=None, help="MoE layers after the dense one (layer-slice default 3)")
    p.add_argument("--fp8", action="store_true", help="store projections as FP8 e4m3 with 128x128 block scales")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .make_model import make_model

    out = args.out or f"models/{args.preset}"
    overrides = {}
    if args.num_moe_layers is not None:
        overrides["num_moe_layers"] = args.num_moe_layers
    path = make_model(args.preset, out, seed=args.seed, fp8=args.fp8, progress=args.preset != "tiny", **overrides)
    print(f"wrote {args.preset} checkpoint to {path}")
    return 0
