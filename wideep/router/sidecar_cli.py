"""`wideep sidecar`: the decode pod's routing proxy (flags mirror llm-d-routing-sidecar)."""
from __future__ import annotations

import argparse

from wideep.logs import setup_logging
from wideep.errors import UsageExit


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sidecar", help="decode-pod routing sidecar: prefill leg to x-prefiller-host-port, then local decode",
        description="Listener PORT+i forwards to VLLM_PORT+i. A request with x-prefiller-host-port is first "
                    "prefilled there (one token, KV held), then decoded locally with the returned kv_transfer_params.")
    p.add_argument("--port", type=int, default=8000, help="first listener port (rank i listens on PORT+i)")
    p.add_argument("--vllm-port", "--model-server-port", dest="vllm_port", type=int, default=8200,
                   help="first local decode server port (rank i on VLLM_PORT+i)")
    p.add_argument("--data-parallel-size", type=int, default=1, help="number of local DP ranks / listeners")
    p.add_argument("--host", default="0.0.0.0", help="listen address")
    p.add_argument("--vllm-host", default="127.0.0.1", help="address of the local decode servers")
    p.add_argument("--prefiller-allowlist", default=None,
                   help="comma-separated host:port (or bare host) entries x-prefiller-host-port may name (SSRF guard)")
    p.add_argument("--allowlist-file", default=None, help="file with one allowlist entry per line")
    p.add_argument("--on-prefill-failure", choices=["local", "error"], default="local",
                   help="prefill host down or 5xx: decode prefills itself (local) or answer 502 (error)")
    p.add_argument("--enable-prefiller-sampling", action="store_true",
                   help="the header may list several prefillers (comma-separated); pick one at random")
    p.add_argument("--enable-ssrf-protection", action="store_true",
                   help="require an allowlist (llm-d flag); without one every prefilled request is refused")
    p.add_argument("--connector", "--kv-connector", dest="connector", default="nixlv2",
                   help="P/D protocol (only nixlv2: vLLM NixlConnector kv_transfer_params)")
    p.add_argument("--prefill-timeout", type=float, default=600.0, help="seconds to wait for the prefill leg")
    p.add_argument("--log-level", default=None,
                   help="log level (default: $WIDEEP_LOG_LEVEL, else info; info logs one access line per request)")
    p.set_defaults(func=_main)


def build_config(args: argparse.Namespace):
    from wideep.router.sidecar import SidecarConfig

    if args.connector not in ("nixlv2", "nixl", "wideep"):
        raise UsageExit(f"--connector {args.connector!r} is not supported; use nixlv2")
    allow: list[str] | None = None
    if args.prefiller_allowlist is not None:
        allow = [e for e in args.prefiller_allowlist.split(",") if e.strip()]
    if args.allowlist_file:
        with open(args.allowlist_file) as f:
            allow = (allow or []) + [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if args.enable_ssrf_protection and allow is None:
        allow = []  # protection on, nothing allowed: every x-prefiller-host-port is refused with 403
    return SidecarConfig(port=args.port, vllm_port=args.vllm_port, data_parallel_size=args.data_parallel_size,
                         host=args.host, vllm_host=args.vllm_host, prefiller_allowlist=allow,
                         on_prefill_failure=args.on_prefill_failure,
                         enable_prefiller_sampling=args.enable_prefiller_sampling,
                         prefill_timeout_s=args.prefill_timeout)


def _main(args: argparse.Namespace) -> int:
    import asyncio

    from wideep.router.sidecar import run_sidecar
    from wideep.utils.aio import install_uvloop

    setup_logging("sidecar", args.log_level)
    cfg = build_config(args)
    install_uvloop()
    try:
        asyncio.run(run_sidecar(cfg))
    except KeyboardInterrupt:
        pass
    return 0
