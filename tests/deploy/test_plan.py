"""The local layout `wideep up` runs: LWS env per pod, the renderer's flags with numbers, no shared ports."""
from __future__ import annotations

from pathlib import Path

from wideep.deploy.plan import plan_stack
from wideep.deploy.ports import PortAllocator
from wideep.deploy.spec import load_spec, spec_from_dict
from wideep.utils.net import free_port_range

ROOT = Path(__file__).resolve().parents[2]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multi_node_groups_get_lws_env_and_distinct_ports():
    import yaml

    d = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    d["decode"].update(replicas=2, nodes=2, data_parallel_size=4)
    d["prefill"].update(nodes=1, data_parallel_size=2)
    spec = spec_from_dict(d)
    plan = plan_stack(spec, PortAllocator(), router_port=0, config_path="c.yaml", endpoints_file="e.yaml",
                      base_env={})
    assert [g.name for g in plan.groups] == ["prefill-0", "decode-0", "decode-1"]
    dec = plan.groups[1]
    worker = next(p for p in dec.others if p.name == "decode-0/worker-1")
    assert worker.env["LWS_WORKER_INDEX"] == "1" and worker.env["LWS_GROUP_SIZE"] == "2"
    assert worker.env["LWS_LEADER_ADDRESS"] == "127.0.0.1"
    assert _flag(worker.argv, "--data-parallel-start-rank") == "2"
    assert _flag(worker.argv, "--data-parallel-size") == "4"
    assert _flag(worker.argv, "--data-parallel-rpc-port") == _flag(dec.leader.argv, "--data-parallel-rpc-port")
    assert worker.env["WIDEEP_KV_SIDE_CHANNEL_PORT"] == dec.leader.env["WIDEEP_KV_SIDE_CHANNEL_PORT"]
    assert plan.groups[2].leader.env["WIDEEP_KV_SIDE_CHANNEL_PORT"] != dec.leader.env["WIDEEP_KV_SIDE_CHANNEL_PORT"]
    all_ports = [p for g in plan.groups for proc in g.procs for p in proc.ports] + plan.router.ports
    assert len(all_ports) == len(set(all_ports))
    roles = {e.role for e in plan.endpoints}
    assert roles == {"prefill", "decode"} and len(plan.endpoints) == 2 + 2 * 4
    sidecar = next(p for p in dec.others if p.name == "decode-0/sidecar-1")
    allow = next(a for a in sidecar.argv if a.startswith("--prefiller-allowlist="))
    assert allow.split("=", 1)[1] == ",".join(e.address for e in plan.endpoints if e.role == "prefill")


def test_port_base_is_honored():
    base = free_port_range(64)
    spec = load_spec(ROOT / "examples" / "tiny-cpu.yaml")
    plan = plan_stack(spec, PortAllocator(base), router_port=0, config_path="c", endpoints_file="e",
                      base_env={})
    ports = [p for g in plan.groups for proc in g.procs for p in proc.ports] + plan.router.ports
    assert all(base <= p < base + 64 for p in ports), ports
    assert "--endpoints-file" in plan.router.argv and "--envoy" not in plan.router.argv
