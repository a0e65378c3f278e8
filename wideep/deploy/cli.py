"""`wideep up`, `wideep render`, `wideep status`: one deployment spec, run here or rendered for a cluster.

Top-level imports stay light (the CLI registry imports this module for `wideep --help`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wideep.errors import UsageExit


def register(subparsers) -> None:
    up = subparsers.add_parser(
        "up", help="run a deployment spec on this host (router + prefill and decode groups)",
        description="Starts the same processes a pod would run (wideep serve per node, wideep sidecar on decode, "
                    "wideep router), waits for health in start-up order, restarts a whole group when one of its "
                    "processes dies, and stops everything on Ctrl-C/SIGTERM. With no -f: the embedded default "
                    "(tiny model on the CPU, made if absent).")
    up.add_argument("-f", "--file", dest="spec", default=None, help="deployment spec YAML (default: embedded tiny CPU stack)")
    up.add_argument("--port-base", type=int, default=None,
                    help="allocate internal ports upward from here (default: ephemeral free ports)")
    up.add_argument("--router-port", type=int, default=None, help="router HTTP port (default: the spec's, or a free one)")
    up.add_argument("--state-file", default=None,
                    help="where to write the running stack's layout for `wideep status` (default: $XDG_CACHE_HOME/wideep/up.json, i.e. ~/.cache/wideep/up.json)")
    up.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the stack to be healthy (default: %(default)s)")
    up.add_argument("--max-restarts", type=int, default=10, help="group restarts before `up` gives up, per group (default: %(default)s)")
    up.add_argument("--log-dir", default=None, help="also write each component's log to DIR/<component>.log")
    up.add_argument("--quiet", action="store_true", help="do not stream component logs (the ready line still prints)")
    up.set_defaults(func=_up)

    render = subparsers.add_parser(
        "render", help="write Kubernetes manifests for a deployment spec (LeaderWorkerSet or Grove)",
        description="Per role a LeaderWorkerSet (or one Grove PodCliqueSet), an InferencePool, the Endpoint Picker "
                    "(wideep router), the gateway objects, PodMonitors when monitoring is on, and a "
                    "kustomization.yaml (`kubectl apply -k DIR`).")
    render.add_argument("-f", "--file", dest="spec", default=None, help="deployment spec YAML (default: embedded)")
    render.add_argument("--target", choices=["lws", "grove"], default="lws")
    render.add_argument("--provider", choices=["none", "gke", "coreweave"], default="none",
                        help="RDMA/network patches for the model-server pods")
    render.add_argument("--model-server", choices=["wideep", "vllm"], default="wideep",
                        help="vllm: llm-d's wide-EP `vllm serve` command lines behind the wideep router")
    render.add_argument("--out", default=None, help="output folder (default: print all objects to stdout)")
    render.set_defaults(func=_render)

    status = subparsers.add_parser(
        "status", help="health, load (running/waiting) and KV usage of every rank of a running stack",
        description="Reads the layout `wideep up` wrote (or the spec's ports on this host, or --url endpoints) "
                    "and scrapes each rank's /health and /metrics.")
    status.add_argument("-f", "--file", dest="spec", default=None, help="spec whose default ports to probe on localhost")
    status.add_argument("--state-file", default=None, help="layout written by `wideep up` (default: $XDG_CACHE_HOME/wideep/up.json, i.e. ~/.cache/wideep/up.json)")
    status.add_argument("--url", action="append", default=[], help="a rank's base URL (repeatable)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_status)


def _load(spec_path: str | None):
    from wideep.deploy.defaults import default_spec_path
    from wideep.deploy.spec import SpecError, load_spec

    path = Path(spec_path) if spec_path else default_spec_path()
    if not path.is_file():
        raise UsageExit(f"wideep: spec file {path} does not exist")
    try:
        return load_spec(path), path
    except SpecError as exc:
        raise UsageExit(f"wideep: invalid spec {path}: {exc}") from None


def _render(args: argparse.Namespace) -> int:
    from wideep.deploy.render import render_bundle, write_bundle
    from wideep.deploy.render.bundle import dump_objects
    from wideep.deploy.spec import SpecError

    spec, path = _load(args.spec)
    try:
        files = render_bundle(spec, target=args.target, provider=args.provider, model_server=args.model_server,
                              base_dir=path.parent)
    except SpecError as exc:
        raise UsageExit(f"wideep: invalid spec {path}: {exc}") from None
    if args.out:
        written = write_bundle(files, Path(args.out))
        for p in written:
            print(p)
        print(f"wideep: wrote {len(written)} files; apply with: kubectl apply -k {args.out}", file=sys.stderr)
    else:
        sys.stdout.write("---\n".join(dump_objects(objs) for name, objs in files.items() if name != "kustomization.yaml"))
    return 0


def _up(args: argparse.Namespace) -> int:
    from wideep.deploy.launcher import run_up

    spec, path = _load(args.spec)
    return run_up(spec, spec_dir=path.parent, port_base=args.port_base, router_port=args.router_port,
                  state_file=args.state_file, ready_timeout=args.ready_timeout, max_restarts=args.max_restarts,
                  log_dir=args.log_dir, quiet=args.quiet)


def _status(args: argparse.Namespace) -> int:
    from wideep.deploy.status import run_status

    return run_status(spec_path=args.spec, state_file=args.state_file, urls=args.url, as_json=args.json)
