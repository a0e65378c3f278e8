"""`wideep router`: the llm-d-compatible Endpoint Picker (docs/protocols.md, "Router"). Imports stay light here."""
from __future__ import annotations

import argparse

from wideep.logs import setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling")
    g.add_argument("--config", "--config-file", dest="config_file", metavar="FILE",
                   help="EndpointPickerConfig YAML (default: the llm-d wide-ep-lws config)")
    g.add_argument("--config-text", help="EndpointPickerConfig as a string")
    g.add_argument("--print-default-config", action="store_true", help="print the default config and exit")
    g.add_argument("--failure-mode", default="FailOpen", choices=["FailOpen", "FailClose"])
    e = p.add_argument_group("endpoints")
    e.add_argument("--endpoint", dest="endpoints", action="append", default=[], metavar="IP:PORT[,role=prefill]",
                   help="one endpoint (repeatable); options: role=prefill|decode|both, name=, rank=, "
                        "kv-events=tcp://h:p, kv-events-replay=tcp://h:p, label.<k>=<v>")
    e.add_argument("--endpoints-file", metavar="YAML",
                   help="list of {address: ip:port, name, labels: {llm-d.ai/role: prefill|decode}, rank, kvEvents}")
    e.add_argument("--pool-name", help="Kubernetes InferencePool to follow (in-cluster)")
    e.add_argument("--pool-namespace", default="default")
    e.add_argument("--pool-selector", metavar="K=V[,K=V]", help="pod label selector instead of an InferencePool")
    e.add_argument("--target-ports", metavar="P[,P]", help="with --pool-selector: one endpoint per port per pod")
    e.add_argument("--k8s-api-server", help="API server URL (default: in-cluster)")
    e.add_argument("--k8s-poll", action="store_true",
                   help="LIST the pods every 2 s instead of following them with a watch")
    e.add_argument("--refresh-metrics-interval", type=float, default=0.05, metavar="S",
                   help="scrape each endpoint's /metrics every S seconds (default 0.05)")
    e.add_argument("--staleness", type=float, default=2.0, metavar="S",
                   help="an endpoint with no good scrape for S seconds leaves the pool (default 2)")
    s = p.add_argument_group("serving")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--envoy", action="store_const", dest="mode", const="envoy",
                      help="gateway mode: ext_proc + start Envoy (ORIGINAL_DST on x-gateway-destination-endpoint)")
    mode.add_argument("--ext-proc", action="store_const", dest="mode", const="ext-proc",
                      help="gateway mode for an external Envoy/gateway: ext_proc gRPC only")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, help="proxy port (default 8080 built-in, 8081 with --envoy)")
    s.add_argument("--grpc-port", type=int, default=9002)
    s.add_argument("--grpc-health-port", type=int, default=9003)
    s.add_argument("--metrics-port", type=int, default=9090)
    s.add_argument("--envoy-admin-port", type=int, default=9901)
    s.add_argument("--envoy-concurrency", type=int, default=1)
    s.add_argument("--workdir", help="where --envoy writes envoy.yaml and envoy.log")
    s.add_argument("--log-level", default=None,
                   help="log level (default: $WIDEEP_LOG_LEVEL, else info; info logs one access line per request)")


def register(subparsers) -> None:
    p = subparsers.add_parser("router", help="llm-d-compatible router: Endpoint Picker + proxy or Envoy ext_proc",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=main, mode="builtin")


def _kv_list(text: str | None, flag: str) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"{flag}: {part!r} must be key=value")
        out[k.strip()] = v.strip()
    return out


def options_from_args(args):
    from wideep.router.app import RouterOptions

    return RouterOptions(
        config_file=args.config_file, config_text=args.config_text, endpoints=list(args.endpoints),
        endpoints_file=args.endpoints_file, pool_name=args.pool_name, pool_namespace=args.pool_namespace,
        pool_selector=_kv_list(args.pool_selector, "--pool-selector"),
        target_ports=[int(x) for x in args.target_ports.split(",")] if args.target_ports else None,
        k8s_api_server=args.k8s_api_server, k8s_watch=not args.k8s_poll, mode=args.mode or "builtin", host=args.host, port=args.port,
        grpc_port=args.grpc_port, grpc_health_port=args.grpc_health_port, metrics_port=args.metrics_port,
        envoy_admin_port=args.envoy_admin_port, envoy_concurrency=args.envoy_concurrency,
        refresh_metrics_interval_s=args.refresh_metrics_interval, staleness_s=args.staleness,
        failure_mode=args.failure_mode, workdir=args.workdir)


def main(args) -> int:
    import sys

    setup_logging("router", args.log_level)
    if args.print_default_config:
        from wideep.router.config import default_config_text

        print(default_config_text(), end="")
        return 0
    from wideep.router.app import Router, run_router
    from wideep.router.registry import ConfigError

    try:
        opts = options_from_args(args)
        opts.validate()
        Router(opts)  # fail fast on config/endpoint errors before binding anything
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"wideep router: error: {exc}", file=sys.stderr)
        return 2
    return run_router(opts)
