"""The local layout of a spec: which processes `wideep up` runs, with which ports and env.

Each pod of a LeaderWorkerSet group becomes a `wideep serve` process (plus `wideep sidecar` on
decode) with the env LWS would inject (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX); the
flags come from the same builder the renderer uses, with numbers in place of shell expressions.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from wideep.deploy.commands import RankLayout, router_argv, serve_argv, sidecar_argv
from wideep.deploy.ports import PortAllocator
from wideep.deploy.spec import DeploySpec, RoleSpec

HOST = "127.0.0.1"


def wideep_executable() -> list[str]:
    return [sys.executable, "-m", "wideep"]


@dataclass
class ProcPlan:
    """One OS process (one container of a pod)."""
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_urls: list[str]          # each must answer 200 before the process counts as ready
    live_url: str | None = None    # polled after start-up; repeated failures restart the group
    ports: list[int] = field(default_factory=list)
    tcp_ports: list[int] = field(default_factory=list)   # must accept connections before ready


@dataclass
class GroupPlan:
    """Restarted as a unit (RecreateGroupOnPodRestart). procs[0] is the leader's model server."""
    name: str
    role: str
    leader: ProcPlan
    others: list[ProcPlan]

    @property
    def procs(self) -> list[ProcPlan]:
        return [self.leader, *self.others]


@dataclass
class Endpoint:
    address: str
    name: str
    role: str

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "name": self.name, "labels": {"llm-d.ai/role": self.role}}


@dataclass
class StackPlan:
    groups: list[GroupPlan]
    router: ProcPlan
    router_url: str
    endpoints: list[Endpoint]
    rank_urls: dict[str, str]      # "prefill-0/rank-0" -> model server base URL (status)


def _group(spec: DeploySpec, role_name: str, role: RoleSpec, g: int, ports: PortAllocator,
           base_env: dict[str, str], prefillers: list[str]) -> tuple[GroupPlan, list[Endpoint], dict[str, str]]:
    exe = wideep_executable()
    gname = f"{role_name}-{g}"
    rpc_port = ports.single()
    side_channel = ports.block(role.data_parallel_size)   # rank r uses base + global rank r
    kv_events = None
    if "kv-events-config" in {k.replace("_", "-") for k in role.engine_args}:
        cfg = next(v for k, v in role.engine_args.items() if k.replace("_", "-") == "kv-events-config")
        kv_events = dict(cfg, endpoint=f"tcp://*:{ports.block(role.data_parallel_size)}")
    leader: ProcPlan | None = None
    others: list[ProcPlan] = []
    endpoints: list[Endpoint] = []
    ranks: dict[str, str] = {}
    n_local = role.dp_per_node
    for node in range(role.nodes):
        http = ports.block(n_local)
        sup = ports.single()
        layout = RankLayout(port=str(http), supervisor_port=str(sup), dp_size=str(role.data_parallel_size),
                            dp_size_local=str(n_local), start_rank=str(node * n_local), dp_address=HOST,
                            rpc_port=str(rpc_port), host=HOST)
        # One host: NIXL's UCX lanes on loopback (CUDA IPC and shared memory are not net devices).
        env = {**base_env, "UCX_NET_DEVICES": "lo", **role.env,
               "LWS_LEADER_ADDRESS": HOST, "LWS_GROUP_SIZE": str(role.nodes), "LWS_WORKER_INDEX": str(node),
               "DP_SIZE_LOCAL": str(n_local), "TP_SIZE": "1",
               "WIDEEP_KV_SIDE_CHANNEL_PORT": str(side_channel), "VLLM_NIXL_SIDE_CHANNEL_HOST": HOST}
        tag = "leader" if node == 0 else f"worker-{node}"
        serve = ProcPlan(name=f"{gname}/{tag}", argv=[str(w) for w in serve_argv(
                             spec, role, layout, executable=exe, kv_events_config=kv_events)],
                         env=env, ready_urls=[f"http://{HOST}:{sup}/readyz"], live_url=f"http://{HOST}:{sup}/health",
                         ports=[*range(http, http + n_local), sup])
        if node == 0:
            leader = serve
        else:
            others.append(serve)
        for i in range(n_local):
            ranks[f"{gname}/rank-{node * n_local + i}"] = f"http://{HOST}:{http + i}"
        if role_name == "decode":
            sc = ports.block(n_local)
            others.append(ProcPlan(
                name=f"{gname}/sidecar-{node}", argv=sidecar_argv(role, port=sc, vllm_port=http, executable=exe,
                                                    allowlist=prefillers, host=HOST),
                env={**base_env, "LWS_LEADER_ADDRESS": HOST, "LWS_GROUP_SIZE": str(role.nodes),
                     "LWS_WORKER_INDEX": str(node)},
                ready_urls=[f"http://{HOST}:{sc + i}/sidecar/stats" for i in range(n_local)],
                ports=list(range(sc, sc + n_local))))
            endpoints += [Endpoint(f"{HOST}:{sc + i}", f"{gname}-rank-{node * n_local + i}", "decode")
                          for i in range(n_local)]
        else:
            endpoints += [Endpoint(f"{HOST}:{http + i}", f"{gname}-rank-{node * n_local + i}", "prefill")
                          for i in range(n_local)]
    assert leader is not None
    return GroupPlan(gname, role_name, leader, others), endpoints, ranks


def plan_stack(spec: DeploySpec, ports: PortAllocator, *, router_port: int | None, config_path: str,
               endpoints_file: str, base_env: dict[str, str]) -> StackPlan:
    groups: list[GroupPlan] = []
    endpoints: list[Endpoint] = []
    ranks: dict[str, str] = {}
    rport = ports.prefer(router_port if router_port is not None else spec.router.port)
    for role_name, role in spec.roles():
        for g in range(role.replicas):
            prefillers = [e.address for e in endpoints if e.role == "prefill"]
            group, eps, rk = _group(spec, role_name, role, g, ports, base_env, prefillers)
            groups.append(group)
            endpoints += eps
            ranks.update(rk)
    grpc, health, metrics = ports.single(), ports.single(), ports.single()
    envoy = spec.gateway.mode == "standalone"   # locally the router starts Envoy itself
    admin = ports.single() if envoy else None
    argv = router_argv(spec, config_path=config_path, port=rport, grpc_port=grpc, health_port=health,
                       metrics_port=metrics, executable=wideep_executable(), endpoints_file=endpoints_file,
                       mode="envoy" if envoy else "builtin", envoy_admin_port=admin, host=HOST)
    # Built-in proxy: its /health is 200 once an endpoint is ready. Envoy: the EPP's metrics /health,
    # then the Envoy listener accepting connections.
    ready = [f"http://{HOST}:{metrics}/health"] if envoy else [f"http://{HOST}:{rport}/health"]
    router = ProcPlan(name="router", argv=argv, env=dict(base_env), ready_urls=ready, live_url=None,
                      ports=[p for p in (rport, grpc, health, metrics, admin) if p is not None],
                      tcp_ports=[rport] if envoy else [])
    return StackPlan(groups=groups, router=router, router_url=f"http://{HOST}:{rport}", endpoints=endpoints,
                     rank_urls=ranks)
