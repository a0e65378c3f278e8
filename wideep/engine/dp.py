"""N engine ranks as N processes: the DP×EP engine process and the offline multi-rank generate.

`run_dp_engine_process` is the engine-process entry for data_parallel_size > 1: it joins the EP
group, builds the expert-parallel model (dispatcher backend, this rank's expert slots, EPLB hooks)
and runs the ordinary engine loop (wideep.engine.proc) with the DP lockstep coordinator. On CUDA,
decode steps replay CUDA graphs captured on every rank with the static-shape decode backend
(graph_dispatch.py), one graph size agreed per step (step_shape.py); on CPU (gloo) ranks run eagerly.
`generate_dp` starts all ranks on this host, spreads requests over them and collects the outputs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Sequence

from wideep.errors import WideepError
from wideep import envs
from wideep.utils.device import resolve_device

log = logging.getLogger(__name__)


def build_ep_core(args, pcfg, group, coordinator=None):
    """EngineCore for one EP rank: dispatcher, this rank's expert slots, routing/EPLB hooks."""
    from wideep.engine.core import EngineCore, resolve_dtype
    from wideep.model.config import ModelConfig
    from wideep.model.loader import load_model
    from wideep.parallel.eplb import EplbState, ExpertRouter, check_eplb_sizes, initial_placement, maps_from_phy2log
    from wideep.parallel.graph_dispatch import make_graph_mode_dispatcher

    cfg = ModelConfig.from_dir(args.model)
    n_log = int(cfg.n_routed_experts)
    redundant = args.eplb_config.num_redundant_experts if args.enable_eplb else 0
    n_phy = check_eplb_sizes(n_log, redundant, pcfg.ep_size)
    moe_ids = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    position = {layer: k for k, layer in enumerate(moe_ids)}
    phy2log = initial_placement(n_log, n_phy, len(moe_ids))
    per = n_phy // pcfg.ep_size
    lo = pcfg.ep_rank * per

    def local_expert_ids(layer: int) -> list[int]:
        return phy2log[position[layer], lo:lo + per].tolist()

    # the configured backend for prefill/mixed steps, a capturable one for CUDA-graph decode
    device = group.device
    decode_mode = None if _eager_only(args) else "CUDA graph" if device.type == "cuda" else "static-shape"
    dispatcher = make_graph_mode_dispatcher(pcfg.all2all_backend, n_phy, ep_rank=pcfg.ep_rank,
                                            ep_size=pcfg.ep_size, group=group.group, agree_group=group.cpu_group,
                                            decode_mode=decode_mode)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, device, dtype, dispatcher=dispatcher, ep_rank=pcfg.ep_rank,
                       ep_size=pcfg.ep_size, local_expert_ids=local_expert_ids,
                       quantization=args.quantization)
    eplb = None
    routers: list[Any] = []
    if args.enable_eplb:
        ec = args.eplb_config
        num_nodes = max(1, pcfg.ep_size // pcfg.data_parallel_size_local)
        eplb = EplbState(model.moe_layers(), n_log, n_phy, pcfg.ep_rank, pcfg.ep_size, ec.window_size,
                         ec.step_interval, num_groups=int(cfg.n_group or 1), num_nodes=num_nodes,
                         group=group.group, device=device, phy2log=phy2log)
        routers = eplb.routers
    elif pcfg.ep_size > 1:
        # identity routing (physical == logical), only there to randomize dummy forwards
        for i, layer in enumerate(model.moe_layers()):
            l2p, cnt = maps_from_phy2log(phy2log[i], n_log, 1)
            r = ExpertRouter(l2p, cnt, n_phy, salt=pcfg.ep_rank, device=device)
            r.record = False
            layer.expert_map = r
            routers.append(r)
    for r in routers:   # graph forwards: padding/dummy rows are not expert load (EPLB statistics)
        r.real_rows = dispatcher.real_rows
    args = dataclasses.replace(args, device=str(device))
    core = EngineCore(args, model=model)   # captures the decode graphs (collectives: all ranks, same order)
    sizes = static_decode_sizes_from_env()
    if sizes and device.type != "cuda" and not args.enforce_eager:
        core.runner.use_static_decode(sizes)
    _agree_on_graphs(core, group)
    if coordinator is not None:
        coordinator.attach(group, dispatcher=dispatcher, eplb=eplb, routers=routers)
    return core


STATIC_DECODE_ENV = "WIDEEP_STATIC_DECODE_SIZES"


def static_decode_sizes_from_env() -> list[int]:
    """$WIDEEP_STATIC_DECODE_SIZES="1,2,4": on CPU (gloo cannot be captured, so no CUDA graphs) run
    decode through the graph path anyway, with eager stand-ins of those sizes: the same per-step
    agreement, padding, static-shape dispatch and dummy replays as CUDA graphs on GPU."""
    raw = envs.WIDEEP_STATIC_DECODE_SIZES
    try:
        return sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"${STATIC_DECODE_ENV} must be a comma-separated list of batch sizes, got {raw!r}") from None


def _agree_on_graphs(core, group) -> None:
    """Every rank must replay the same graph sizes; if capture differed anywhere, all run eagerly."""
    import torch.distributed as dist

    from wideep.parallel.dist import EPGroupError

    mine = sorted(core.runner.graphs)
    if group.size == 1:
        return
    everyone: list[Any] = [None] * group.size
    try:
        dist.all_gather_object(everyone, mine, group=group.cpu_group)
    except Exception as exc:  # noqa: BLE001
        raise EPGroupError(f"rank {group.rank}: agreeing on CUDA graph sizes failed: {exc}") from exc
    if any(e != mine for e in everyone):
        log.warning("rank %d: CUDA graph sizes differ across ranks (%s); decode runs eagerly on every rank",
                    group.rank, everyone)
        core.runner.graphs.clear()
    elif group.rank == 0 and not mine:
        log.info("EP group: every step runs eagerly on all %d ranks", group.size)
    elif group.rank == 0:
        log.info("EP group: %s decode graph sizes %s on all %d ranks",
                 "CUDA" if core.device.type == "cuda" else "static-shape (eager stand-in)", mine, group.size)


def _eager_only(args) -> bool:
    """CPU ranks talk over gloo, which CUDA graphs cannot capture: eager there, graphs on CUDA."""
    if args.enforce_eager:
        return True
    on_cuda = resolve_device(args.device).type == "cuda"
    return not on_cuda and not static_decode_sizes_from_env()   # the CPU stand-ins are an explicit opt-in


def run_dp_engine_process(args_dict: dict, input_addr: str, output_addr: str, ready=None) -> None:
    """Engine process of one DP rank (spawned; args carry data_parallel_rank and the group address)."""

    from wideep.engine.config import EngineArgs
    from wideep.engine.proc import run_engine_process
    from wideep.parallel.config import ParallelConfig
    from wideep.parallel.dist import destroy_ep_group, init_ep_group
    from wideep.engine.lockstep import DPLockstepCoordinator

    args = EngineArgs.from_dict(args_dict)
    pcfg = ParallelConfig.from_engine_args(args)
    coordinator = DPLockstepCoordinator(dp_address=pcfg.data_parallel_address)

    built: dict[str, Any] = {}

    def factory(a):
        group = init_ep_group(pcfg, device=a.device)
        built["core"] = build_ep_core(a, pcfg, group, coordinator)
        return built["core"]

    try:
        run_engine_process(args, input_addr, output_addr, ready, coordinator=coordinator, core_factory=factory)
        if "core" in built:   # shut down normally: let peers finish the current lockstep wave with us
            coordinator.leave_wave(built["core"])
    finally:
        coordinator.close()
        destroy_ep_group(timeout_s=5)


class DPRunError(WideepError, RuntimeError):
    """A multi-rank run failed: a rank died, raised or the run timed out. The message names the ranks."""


def generate_dp(args, requests: Sequence, assignment: Sequence[int] | None = None,
                start_delay_s: dict[int, float] | None = None, timeout_s: float = 600.0) -> dict[str, list]:
    """Run data_parallel_size engine ranks as processes on this host and serve `requests` on them.

    assignment[i]: the rank that serves requests[i] (default round robin); start_delay_s[rank]:
    seconds before that rank gets its first request (a rank idle for a while still joins every
    forward of the others). Returns {request_id: [RequestOutput, ...]} in arrival order.
    """
    n = args.data_parallel_size
    if assignment is None:
        assignment = [i % n for i in range(len(requests))]
    if len(assignment) != len(requests) or any(not 0 <= r < n for r in assignment):
        raise ValueError(f"assignment must give a rank in [0, {n}) for each of the {len(requests)} requests")
    return asyncio.run(_generate_dp(args, list(requests), list(assignment), dict(start_delay_s or {}), timeout_s))


async def _generate_dp(args, requests, assignment, delays, timeout_s) -> dict[str, list]:
    from wideep.engine.client import AsyncEngineClient, ipc_addresses, spawn_engine_process
    from wideep.utils.net import free_port

    n = args.data_parallel_size
    port = free_port()
    clients: list[AsyncEngineClient] = []
    try:
        for rank in range(n):
            rank_args = dataclasses.replace(
                args, data_parallel_rank=rank, data_parallel_size_local=n, data_parallel_start_rank=0,
                data_parallel_address="127.0.0.1", data_parallel_rpc_port=port, enforce_eager=_eager_only(args))
            inp, out = ipc_addresses()
            client = AsyncEngineClient(inp, out)
            client.process = spawn_engine_process(rank_args, inp, out, target=run_dp_engine_process)
            clients.append(client)
        try:
            await asyncio.wait_for(asyncio.gather(*(c.wait_ready(timeout_s) for c in clients)), timeout_s)
        except Exception as exc:
            raise DPRunError(f"DP engines failed to start: {_rank_states(clients)}\n{exc}") from exc

        async def serve(rank: int, req) -> tuple[str, list]:
            await asyncio.sleep(delays.get(rank, 0.0))
            outs = [o async for o in clients[rank].generate(req)]
            return req.request_id, outs

        tasks = [asyncio.ensure_future(serve(r, req)) for r, req in zip(assignment, requests)]
        try:
            done = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
        except asyncio.TimeoutError as exc:
            raise DPRunError(f"DP run did not finish within {timeout_s:.0f}s: {_rank_states(clients)}") from exc
        except Exception as exc:
            raise DPRunError(f"DP run failed: {_rank_states(clients)}\n{exc}") from exc
        finally:
            for t in tasks:
                t.cancel()
        return dict(done)
    finally:
        await asyncio.gather(*(_shutdown(c) for c in clients), return_exceptions=True)


def _rank_states(clients) -> str:
    states = []
    for r, c in enumerate(clients):
        p = c.process
        states.append(f"rank {r}: " + ("running" if p is not None and p.is_alive()
                                       else f"exited ({p.exitcode if p is not None else '?'})"))
    return "; ".join(states)


async def _shutdown(client) -> None:
    try:
        await asyncio.wait_for(client.shutdown(timeout=5.0), 15.0)
    except Exception:  # noqa: BLE001
        if client.process is not None and client.process.is_alive():
            client.process.kill()
