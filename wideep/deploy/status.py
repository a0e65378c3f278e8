"""`wideep status`: every rank's health, load (running/waiting) and KV usage, read from /health and /metrics."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
          "vllm:kv_cache_usage_perc": "kv_usage"}


@dataclass
class RankStatus:
    name: str
    url: str
    healthy: bool
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    error: str | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each gauge over its label sets (a rank exports one engine's series)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in GAUGES:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            out[GAUGES[name]] = out.get(GAUGES[name], 0.0) + value
    return out


def _fetch(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def probe(name: str, url: str) -> RankStatus:
    try:
        code, _ = _fetch(url + "/health")
        st = RankStatus(name, url, healthy=code == 200)
        code, text = _fetch(url + "/metrics")
        if code == 200:
            for k, v in parse_metrics(text).items():
                setattr(st, k, v)
        return st
    except (OSError, ValueError) as exc:
        return RankStatus(name, url, healthy=False, error=str(getattr(exc, "reason", exc)))


def ranks_from_spec(spec_path: str) -> dict[str, str]:
    """Without `wideep up`'s layout: the spec's own ports on this host (one node per role)."""
    from wideep.deploy.spec import load_spec

    spec = load_spec(spec_path)
    ranks = {}
    for role_name, role in spec.roles():
        for i in range(role.dp_per_node):
            ranks[f"{role_name}/rank-{i}"] = f"http://127.0.0.1:{role.port + i}"
    return ranks


def run_status(*, spec_path: str | None, state_file: str | None, urls: list[str], as_json: bool) -> int:
    from wideep.deploy.launcher import default_state_file

    router = None
    if urls:
        ranks = {u: u.rstrip("/") for u in urls}
    elif spec_path and not state_file:
        ranks = ranks_from_spec(spec_path)
    else:
        path = Path(state_file) if state_file else default_state_file()
        if not path.is_file():
            print(f"wideep: no running stack found ({path} does not exist); start one with `wideep up`, "
                  "or pass --url / -f", file=sys.stderr)
            return 1
        state = json.loads(path.read_text())
        ranks, router = state["ranks"], state.get("router_url")
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda kv: probe(*kv), ranks.items()))
    if as_json:
        print(json.dumps({"router": router, "ranks": [asdict(r) for r in results]}, indent=1))
    else:
        if router:
            print(f"router  {router}")
        print(f"{'rank':<22} {'health':<8} {'running':>8} {'waiting':>8} {'kv use':>8}  url")
        for r in results:
            def fmt(v, pct=False):
                return "-" if v is None else (f"{v * 100:.1f}%" if pct else f"{v:g}")
            health = "ok" if r.healthy else ("down" if r.error else "unready")
            print(f"{r.name:<22} {health:<8} {fmt(r.running):>8} {fmt(r.waiting):>8} {fmt(r.kv_usage, True):>8}  {r.url}")
    return 0 if all(r.healthy for r in results) else 2
