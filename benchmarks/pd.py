"""P/D benchmark: KV transfer throughput (TCP vs NIXL) and the TTFT P/D adds to a long prompt.

Two processes: a producer (prefill) on --prefill-device and a consumer (decode) on --decode-device.

  1. copy bounds : pinned D2H / H2D copies (what a host-staged transport can reach) and the plain
                   device-to-device copy between the two devices (NVLink peer copy on 2 GPUs; a
                   memcpy on CPU) for the bytes of each prompt's KV.
  2. transfer    : the real connector paths for prompts of several lengths, in GB/s, with the cache
                   layouts of the engine (--kv-layouts: cross-layer = one block-major tensor, each layer's
                   [blocks, block_size, kv_lora_rank + rope] cache a view, one NIXL region; per-layer):
                   tcp  = gather on the producer's device -> pinned host -> TCP -> pinned host -> scatter;
                   nixl = one NIXL READ of the registered caches (VRAM to VRAM on GPU), contiguous
                          block ids (a fresh cache) and scattered ones (a fragmented cache), with the
                          time per READ split into make_prepped_xfer / post / wait / release;
                          --nixl-variants adds rows for other consumer agents (UCX threads, progress thread).
  3. TTFT        : real EngineCores per transport. Aggregated = the decode engine computes the prompt
                   itself. P/D = producer prefill (to its one token) + consumer pull + last-token step,
                   with the decode side's timeline (pull start, pull done, step start, first token);
                   --ttft-decode-modes eager,graphs runs the decode engine eager and with CUDA graphs.

CPU (small, a sanity run):   python benchmarks/pd.py --preset tiny --device cpu
GPU (lead, two GPUs):        python benchmarks/pd.py --preset layer-slice --num-moe-layers 1 --fp8 \
                                 --prefill-device cuda:0 --decode-device cuda:1 --block-size 64 \
                                 --transfer-layers 61 --reps 5 --warmup 1 --nixl-variants 4:prog,0,8 \
                                 --ttft-transports nixl --ttft-decode-modes eager,graphs --markdown
GPU (one GPU, two procs):    ... --prefill-device cuda:0 --decode-device cuda:0
--transports tcp,nixl picks the transports (nixl needs `pip install 'wideep[nixl]'`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wideep.kv_transfer.connector import KVConnector  # noqa: E402
from wideep.kv_transfer.params import KVTransferConfig  # noqa: E402
from wideep.utils.net import free_port  # noqa: E402

R1_LAYERS = 61          # DeepSeek-R1: the full model's KV per token, for extrapolation
R1_KV_DIM = 512 + 64


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fake_request(rid: str, block_ids: list[int]):
    return types.SimpleNamespace(request_id=rid, block_ids=block_ids, finish_reason="length",
                                 kv_transfer_params={"do_remote_decode": True}, num_prompt_tokens=0)


# ------------------------------------------------------------------------------------------ host copy
def host_copy_bandwidth(nbytes: int, device: torch.device, reps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    out["host_memcpy_GBps"] = nbytes * reps / (time.perf_counter() - t) / 1e9
    if device.type == "cuda":
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        for name, (a, b) in {"d2h_pinned_GBps": (pinned, dev), "h2d_pinned_GBps": (dev, pinned)}.items():
            a.copy_(b, non_blocking=True)
            _sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                a.copy_(b, non_blocking=True)
            _sync(device)
            out[name] = nbytes * reps / (time.perf_counter() - t) / 1e9
    return out


def device_copy_bandwidth(nbytes_list: list[int], src: torch.device, dst: torch.device, reps: int) -> list[dict]:
    """One contiguous copy of each size from the producer's device to the consumer's (NVLink peer copy
    between two GPUs): the bound a transfer between the two caches is compared against."""
    rows = []
    for nbytes in nbytes_list:
        a = torch.empty(nbytes, dtype=torch.uint8, device=src)
        b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
        b.copy_(a)
        _sync(src)
        _sync(dst)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            _sync(src)
            _sync(dst)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append({"MB": nbytes / 1e6, "ms": med * 1e3, "GBps": nbytes / med / 1e9})
        del a, b
    return rows


# ------------------------------------------------------------------------------------------ transfer
def _cfg(role: str, engine_id: str, transport: str, threads: int | None = None,
         cross_layers: bool = True) -> KVTransferConfig:
    extra: dict = {"transport": transport, "enable_cross_layers_blocks": cross_layers}
    if threads is not None:
        extra["num_threads"] = threads
    return KVTransferConfig(kv_role=role, engine_id=engine_id, kv_connector_extra_config=extra)


def _parse_variants(spec: str) -> list[dict]:
    """"8,0,4:prog" -> consumer NIXL agents with that many UCX worker threads; ":prog" = with NIXL's
    progress thread (the default has none: the reader's polling progresses the agent)."""
    out = []
    for item in (x for x in spec.split(",") if x):
        n, _, flag = item.partition(":")
        if flag not in ("", "prog"):
            raise ValueError(f"bad NIXL variant {item!r} (want THREADS or THREADS:prog)")
        out.append({"name": item, "threads": int(n), "progress_thread": True if flag else None})
    return out


def _producer_main(conn, layout: dict, device: str, transport: str) -> None:
    """Holds fake requests on command and serves them over the side channel."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)   # copies are memory-bound; spinning OpenMP workers only add latency
    pc = KVConnector(_cfg("kv_producer", "bench-p", transport, cross_layers=layout["cross_layers"]), model="bench",
                     block_size=layout["block_size"], host="127.0.0.1", port=free_port(), listen_host="127.0.0.1")
    caches = _caches(layout, dev, pc.wants_cross_layer_kv())
    for c in caches:
        c.copy_(torch.randn(c.shape, device=dev).to(layout["dtype"]))
    pc.register_kv_caches(caches)
    _sync(dev)
    conn.send({"port": pc.port})
    while True:
        if not conn.poll(0.002):
            pc.finished_sending()    # drains consumers' notifications (NIXL) and frees what was read
            continue
        msg = conn.recv()
        if msg is None:
            break
        _, params = pc.request_finished(_fake_request(msg["rid"], msg["block_ids"]))
        conn.send(params)
    pc.shutdown()


def _caches(layout: dict, dev: torch.device, cross_layer: bool) -> list[torch.Tensor]:
    """The layers' caches as the engine allocates them: per layer, or views of one block-major tensor."""
    from wideep.engine.kv_cache import allocate_kv_caches
    return allocate_kv_caches(layout["layers"], layout["num_blocks"], layout["block_size"], layout["dim"],
                              layout["dtype"], dev, cross_layer)


def _consumer(layout: dict, dev: torch.device, caches, transport: str, variant: dict | None) -> KVConnector:
    from wideep.kv_transfer import nixl as nixl_mod
    orig = nixl_mod.NixlTransport.__init__
    if variant is not None and variant["progress_thread"] is not None:
        def init(self, *a, **kw):
            orig(self, *a, **dict(kw, progress_thread=variant["progress_thread"]))
        nixl_mod.NixlTransport.__init__ = init
    try:
        cc = KVConnector(_cfg("kv_consumer", "bench-d", transport, variant and variant["threads"],
                              layout["cross_layers"]), model="bench",
                         block_size=layout["block_size"], host="127.0.0.1", port=0)
        cc.register_kv_caches(caches)
    finally:
        nixl_mod.NixlTransport.__init__ = orig
    return cc


def transfer_bench(args, layout: dict, prompt_lens: list[int], transport: str = "tcp",
                   runs: list[tuple[dict | None, bool]] = ((None, False),)) -> list[dict]:
    """Consumer pulls of prompts' blocks from one producer process. runs: (NIXL variant or None for
    the default agent, scattered), each with a consumer connector of its own; scattered = both
    sides' block ids random (no two adjacent)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_producer_main, args=(child, layout, args.prefill_device, transport), daemon=True)
    proc.start()
    rows = []
    threads = torch.get_num_threads()
    try:
        parent.recv()
        dev = torch.device(args.decode_device)
        if dev.type == "cpu":
            torch.set_num_threads(1)
        else:
            torch.cuda.set_device(dev)
        caches = _caches(layout, dev, transport == "nixl" and layout["cross_layers"])
        bs = layout["block_size"]
        rng = random.Random(0)
        n = 0
        from wideep.kv_transfer.connector import _Load
        from wideep.kv_transfer.params import RemotePrefillParams
        for variant, scattered in runs:
            cc = _consumer(layout, dev, caches, transport, variant)
            label = (transport + (" cross-layer" if transport == "nixl" and layout["cross_layers"] else " per-layer")
                     + (f" [{variant['name']}]" if variant else "") + (" scattered" if scattered else ""))
            for plen in prompt_lens:
                nblocks = -(-plen // bs)
                if nblocks > layout["num_blocks"]:
                    continue
                times = []
                phases0 = None
                for rep in range(args.warmup + args.reps):
                    if rep == args.warmup and cc.nixl is not None:
                        phases0 = dict(cc.nixl.phase_seconds)
                    n += 1
                    ids = list(range(nblocks))
                    local = list(range(nblocks))
                    if scattered:
                        ids = rng.sample(range(layout["num_blocks"]), nblocks)
                        local = rng.sample(range(layout["num_blocks"]), nblocks)
                    parent.send({"rid": f"b{n}", "block_ids": ids})
                    params = parent.recv()
                    req = types.SimpleNamespace(request_id=f"c{n}", block_ids=local, num_computed_tokens=0,
                                                num_prompt_tokens=plen + 1, kv_transfer_params=params)
                    load = _Load(req, RemotePrefillParams.parse(params), local, ids, 0)
                    t = time.perf_counter()
                    cc._read_blocks(load)
                    _sync(dev)
                    if rep >= args.warmup:
                        times.append(time.perf_counter() - t)
                nbytes = nblocks * sum(c[0].numel() * c.element_size() for c in caches)
                med = statistics.median(times)
                row = {"transport": label, "prompt_tokens": plen, "blocks": nblocks, "MB": nbytes / 1e6,
                       "ms": med * 1e3, "GBps": nbytes / med / 1e9}
                if phases0 is not None:   # mean per READ over the timed reps, microseconds
                    row["phases_us"] = {k: (v - phases0[k]) / args.reps * 1e6 for k, v in cc.nixl.phase_seconds.items()}
                rows.append(row)
            cc.shutdown()
    finally:
        torch.set_num_threads(threads)
        parent.send(None)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return rows


# ------------------------------------------------------------------------------------------ TTFT
def _engine_args(args, device: str, role: str | None, transport: str = "tcp", graphs: bool = False):
    from wideep.engine.config import EngineArgs
    kv = {"kv_connector": "NixlConnector", "kv_role": role, "kv_load_failure_policy": "fail",
          "kv_connector_extra_config": {"transport": transport,
                                        "enable_cross_layers_blocks": args.kv_layouts.split(",")[0] == "cross-layer"}
          } if role else None
    return EngineArgs(model=args.model_dir, device=device, block_size=args.block_size, enforce_eager=not graphs,
                      cuda_graph_sizes=[1, 2, 4, 8], enable_prefix_caching=False, max_model_len=args.prompt_len + 64,
                      max_num_batched_tokens=max(8192, args.prompt_len + 64),
                      kv_cache_memory_bytes=args.kv_cache_bytes, kv_transfer_config=kv)


def _first_token(core, rid, prompt, max_tokens, params=None, marks=None):
    """Runs the request like the engine loop does (engine/proc.py): step while there is work; while
    only KV pulls are pending, wait on the connector's wakeup fd (bounded by kv_transfer_wait_s).
    marks (perf_counter seconds, relative to arrival): step_start = the step that computes the
    request's tokens begins, token = its first token is on the host."""
    import select
    from wideep.engine.api import EngineRequest, SamplingParams
    t = time.perf_counter()
    core.add_request(EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), params))
    fd = core.kv_wakeup_fd()
    while True:
        core.poll_kv_transfers()
        sched = core.schedule()
        if marks is not None and "step_start" not in marks and any(q.request.request_id == rid for q in sched.seqs):
            marks["step_start"] = time.perf_counter() - t
        for o in core.execute(sched):
            if o.request_id == rid and (o.new_token_ids or o.finished):
                _sync(core.device)
                dt = time.perf_counter() - t
                if marks is not None:
                    marks["token"] = dt
                while not o.finished:   # drain the request so its blocks are freed
                    for o2 in core.step():
                        if o2.request_id == rid:
                            o = o2
                core.abort_request(rid)
                return dt, o
        wait = core.kv_transfer_wait_s()
        if wait is not None:
            if fd is None:
                time.sleep(wait)
            else:
                select.select([fd], [], [], wait)


def _prefill_main(conn, args, transport: str) -> None:
    from wideep.engine.core import EngineCore
    dev = torch.device(args.prefill_device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ["WIDEEP_KV_SIDE_CHANNEL_PORT"] = str(free_port())
    core = EngineCore(_engine_args(args, args.prefill_device, "kv_producer", transport))
    conn.send("ready")
    while True:
        if not conn.poll(0.005):
            core.poll_kv_transfers()
            continue
        msg = conn.recv()
        if msg is None:
            break
        if msg.get("aggregated"):   # the same prompt served whole by this engine: P/D's own reference
            dt, out = _first_token(core, msg["rid"], msg["prompt"], 2)   # as the decode engine's aggregated run
            conn.send({"ttft_s": dt, "token": out.new_token_ids})
            continue
        dt, out = _first_token(core, msg["rid"], msg["prompt"], 1, {"do_remote_decode": True})
        conn.send({"prefill_s": dt, "params": out.kv_transfer_params, "token": out.new_token_ids})
    core.connector.shutdown()


def _timed_pulls(connector, t0: list[float], marks: dict) -> None:
    """Records when the consumer's pull starts and ends (relative to the request's arrival, t0[0])."""
    orig = connector._read_blocks

    def read_blocks(load):
        marks["pull_start"] = time.perf_counter() - t0[0]
        try:
            orig(load)
        finally:
            marks["pull_done"] = time.perf_counter() - t0[0]
    connector._read_blocks = read_blocks


def ttft_bench(args, transport: str = "tcp", decode_modes: tuple[str, ...] = ("eager",)) -> list[dict]:
    """One prefill engine process; per decode mode (eager / graphs: CUDA graphs for decode batches, as a
    serving decode engine runs) a decode engine here that runs the prompt aggregated and as P/D."""
    from wideep.engine.core import EngineCore
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_main, args=(child, args, transport), daemon=True)
    proc.start()
    results = []
    try:
        dev = torch.device(args.decode_device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        assert parent.recv() == "ready"
        g = torch.Generator().manual_seed(0)
        k = 0
        for mode in decode_modes:
            core = EngineCore(_engine_args(args, args.decode_device, "kv_consumer", transport, graphs=mode == "graphs"))
            nx = core.connector.nixl if core.connector is not None else None
            t0 = [0.0]
            marks: dict = {}
            _timed_pulls(core.connector, t0, marks)
            agg, agg_p, pre, dec, same, bd = [], [], [], [], True, []
            reads0 = None
            for rep in range(args.warmup + args.reps):
                k += 1
                if rep == args.warmup and nx is not None:
                    reads0 = (nx.stats["transfers"], nx.stats["transfer_seconds"])
                prompt = torch.randint(10, 4000, (args.prompt_len,), generator=g).tolist()
                a, aout = _first_token(core, f"agg{k}", prompt, 2)
                parent.send({"rid": f"ap{k}", "prompt": prompt, "aggregated": True})
                ap = parent.recv()
                parent.send({"rid": f"p{k}", "prompt": prompt})
                r = parent.recv()
                marks.clear()
                t0[0] = time.perf_counter()
                d, dout = _first_token(core, f"d{k}", prompt, 2, r["params"], marks)
                if rep >= args.warmup:
                    agg.append(a)
                    agg_p.append(ap["ttft_s"])
                    pre.append(r["prefill_s"])
                    dec.append(d)
                    bd.append(dict(marks))
                    same = same and dout.new_token_ids[:1] == aout.new_token_ids[:1] == ap["token"][:1]
            res = {"transport": transport, "decode": mode, "graph_sizes": core.graph_sizes(),
                   "prompt_tokens": args.prompt_len,
                   "aggregated_ttft_ms": statistics.median(agg) * 1e3,
                   # the same prompt served whole by the prefill engine (same process and GPU as P/D's prefill)
                   "aggregated_on_prefill_engine_ms": statistics.median(agg_p) * 1e3,
                   "pd_prefill_ms": statistics.median(pre) * 1e3,
                   "pd_decode_first_token_ms": statistics.median(dec) * 1e3,
                   "first_token_equal": same,
                   # decode side, ms after the request's arrival (median per mark)
                   "decode_breakdown_ms": {m: statistics.median(b[m] for b in bd) * 1e3 for m in
                                           ("pull_start", "pull_done", "step_start", "token") if all(m in b for b in bd)}}
            res["pd_ttft_ms"] = res["pd_prefill_ms"] + res["pd_decode_first_token_ms"]
            if reads0 is not None and nx.stats["transfers"] > reads0[0]:
                res["nixl_read_ms_mean"] = ((nx.stats["transfer_seconds"] - reads0[1])
                                            / (nx.stats["transfers"] - reads0[0]) * 1e3)
            res["pd_added_ms"] = res["pd_ttft_ms"] - res["aggregated_ttft_ms"]
            res["pd_added_vs_prefill_engine_ms"] = res["pd_ttft_ms"] - res["aggregated_on_prefill_engine_ms"]
            results.append(res)
            if core.connector is not None:
                core.connector.shutdown()
            del core
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return results
    finally:
        parent.send(None)
        proc.join(60)
        if proc.is_alive():
            proc.kill()


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "layer-slice"])
    ap.add_argument("--num-moe-layers", type=int, default=None)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                    help="model config override for the made checkpoint, e.g. n_routed_experts=16")
    ap.add_argument("--model-dir", default=None, help="use this checkpoint instead of making one")
    ap.add_argument("--device", default=None, help="shorthand for --prefill-device and --decode-device")
    ap.add_argument("--prefill-device", default=None)
    ap.add_argument("--decode-device", default=None)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--transfer-lens", default="512,2048,8192,32768", help="prompt lengths for the transfer table")
    ap.add_argument("--transfer-layers", type=int, default=None,
                    help="KV regions in the transfer table (default: the model's layers; 61 = DeepSeek-R1's full KV)")
    ap.add_argument("--transports", default="tcp,nixl", help="comma-separated: tcp, nixl")
    ap.add_argument("--no-scattered", action="store_true", help="skip the scattered-blocks NIXL rows")
    ap.add_argument("--kv-layouts", default="cross-layer",
                    help="NIXL cache layouts of the transfer table, comma-separated: cross-layer (one block-major "
                         "region, the engine's default), per-layer (one region per layer); TTFT uses the first")
    ap.add_argument("--nixl-variants", default="",
                    help="extra contiguous NIXL rows with other consumer agents: THREADS[:prog],... (e.g. 8,0,4:prog)")
    ap.add_argument("--ttft-transports", default=None, help="transports of the TTFT runs (default: --transports)")
    ap.add_argument("--ttft-decode-modes", default="eager",
                    help="decode engine of the TTFT runs: eager, graphs (CUDA graphs for decode batches) or both")
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="engine KV budget (default 1 GiB GPU, 64 MiB CPU)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here (rewritten after every stage)")
    ap.add_argument("--markdown", action="store_true", help="print a docs/perf.md section")
    args = ap.parse_args(argv)
    default_dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    args.prefill_device = args.prefill_device or args.device or default_dev
    args.decode_device = args.decode_device or args.device or ("cuda:1" if torch.cuda.device_count() > 1 else default_dev)
    on_gpu = torch.device(args.decode_device).type == "cuda"
    args.kv_cache_bytes = args.kv_cache_bytes or ((1 << 30) if on_gpu else (64 << 20))
    transports = [t for t in args.transports.split(",") if t]
    bad = set(transports) - {"tcp", "nixl"}
    if bad:
        ap.error(f"unknown transports {sorted(bad)}")

    tmp = None
    if args.model_dir is None:
        from wideep.model.make_model import make_model
        tmp = tempfile.TemporaryDirectory(prefix="pd-bench-")
        kw = {"fp8": args.fp8}
        for o in args.override:
            k, sep, v = o.partition("=")
            if not sep:
                ap.error(f"--override wants KEY=JSON, got {o!r}")
            kw[k] = json.loads(v)
        if args.num_moe_layers is not None:
            kw["num_moe_layers"] = args.num_moe_layers
        make_model(args.preset, tmp.name, **kw)
        args.model_dir = tmp.name
    cfg = json.loads(Path(args.model_dir, "config.json").read_text())
    dim = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    lens = [int(x) for x in args.transfer_lens.split(",") if x]
    max_blocks = -(-max(lens) // args.block_size)
    layout = {"layers": args.transfer_layers or cfg["num_hidden_layers"], "block_size": args.block_size, "dim": dim,
              "dtype": dtype, "num_blocks": max_blocks if args.no_scattered else 2 * max_blocks}
    per_token = layout["layers"] * dim * torch.empty(0, dtype=dtype).element_size()

    results: dict = {"machine": {"prefill_device": args.prefill_device, "decode_device": args.decode_device,
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                 "cpus": os.cpu_count()},
                     "model": {"preset": args.preset if tmp else f"{Path(args.model_dir).name} (hidden {cfg['hidden_size']})",
                               "layers": layout["layers"], "kv_dim": dim, "model_layers": cfg["num_hidden_layers"],
                               "dtype": str(dtype), "kv_bytes_per_token": per_token},
                     "command": "python benchmarks/pd.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "transfer": [], "ttft": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    results["host_copy"] = host_copy_bandwidth(per_token * args.prompt_len, torch.device(args.decode_device),
                                               max(args.reps, 5))
    sizes = [-(-n // args.block_size) * args.block_size * per_token for n in lens]
    results["device_copy"] = [dict(r, prompt_tokens=n) for n, r in zip(lens, device_copy_bandwidth(
        sizes, torch.device(args.prefill_device), torch.device(args.decode_device), max(args.reps, 5)))]
    save()
    variants = _parse_variants(args.nixl_variants)
    kv_layouts = [x for x in args.kv_layouts.split(",") if x]
    if not kv_layouts or set(kv_layouts) - {"cross-layer", "per-layer"}:
        ap.error(f"--kv-layouts: want cross-layer and/or per-layer, got {args.kv_layouts!r}")
    for t in transports:
        runs: list = [(None, False)]
        if t == "nixl":
            runs += [(None, True)] * (not args.no_scattered) + [(v, False) for v in variants]
        for kl in (kv_layouts if t == "nixl" else ["per-layer"]):
            results["transfer"] += transfer_bench(args, dict(layout, cross_layers=kl == "cross-layer"), lens, t, runs)
            save()
    r1_bytes = R1_LAYERS * R1_KV_DIM * 2 * args.prompt_len
    results["r1_prompt_bytes"] = r1_bytes
    if not args.skip_ttft:
        modes = tuple(m for m in args.ttft_decode_modes.split(",") if m)
        if set(modes) - {"eager", "graphs"}:
            ap.error(f"--ttft-decode-modes: unknown {sorted(set(modes) - {'eager', 'graphs'})}")
        for t in [x for x in (args.ttft_transports or args.transports).split(",") if x]:
            if t not in ("tcp", "nixl"):
                ap.error(f"--ttft-transports: unknown {t!r}")
            results["ttft"] += ttft_bench(args, t, modes)
            save()
    if args.markdown:
        print(to_markdown(results, args))
    else:
        print(json.dumps(results, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


def to_markdown(r: dict, args) -> str:
    m = r["machine"]
    lines = [f"## P/D KV transfer: TCP vs NIXL ({r['date']}, {m['gpu'] or 'CPU'}; prefill {m['prefill_device']}, "
             f"decode {m['decode_device']})", "",
             f"Command: `{r['command']}`", "",
             f"Transfer table over {r['model']['layers']} layer caches x {r['model']['kv_dim']} {r['model']['dtype']} "
             f"= {r['model']['kv_bytes_per_token']} B of KV per token, block size {args.block_size}; consumer pull "
             "timed from request to blocks usable (median). d2d = one contiguous copy of the same bytes between the "
             "two devices. NIXL phases: mean us per READ in make_prepped_xfer / transfer() / until DONE / release.", "",
             "| prompt tokens | MB | d2d copy GB/s | transport | transfer ms | GB/s | % of d2d | NIXL phases us |",
             "|---:|---:|---:|---|---:|---:|---:|---|"]
    d2d = {d["prompt_tokens"]: d for d in r["device_copy"]}
    for t in sorted(r["transfer"], key=lambda x: (x["prompt_tokens"], x["transport"])):
        c = d2d.get(t["prompt_tokens"])
        ph = " / ".join(f"{v:.0f}" for v in t["phases_us"].values()) if "phases_us" in t else "-"
        pct = f"{100 * t['GBps'] / c['GBps']:.0f}%" if c else "-"
        lines.append(f"| {t['prompt_tokens']} | {t['MB']:.1f} | {c['GBps'] if c else float('nan'):.1f} | "
                     f"{t['transport']} | {t['ms']:.2f} | {t['GBps']:.2f} | {pct} | {ph} |")
    hc = ", ".join(f"{k} {v:.1f}" for k, v in r["host_copy"].items())
    lines += ["", f"Host-copy bounds for a {args.prompt_len}-token prompt: {hc} (GB/s)."]
    for t in r["ttft"]:
        bd = ", ".join(f"{k} {v:.2f}" for k, v in t["decode_breakdown_ms"].items())
        mode = t["decode"] + (f" (graphs {t['graph_sizes']})" if t["graph_sizes"] else "")
        lines += ["", f"TTFT over {t['transport']}, decode engine {mode}, {t['prompt_tokens']}-token prompt "
                      f"({r['model']['preset']}, {r['model']['model_layers']} layers): aggregated "
                      f"{t['aggregated_ttft_ms']:.1f} ms; P/D {t['pd_ttft_ms']:.1f} ms = prefill {t['pd_prefill_ms']:.1f}"
                      f" + decode side {t['pd_decode_first_token_ms']:.1f} (ms after arrival: {bd}); P/D adds "
                      f"{t['pd_added_ms']:.1f} ms; against the same prompt served whole by the prefill engine "
                      f"({t['aggregated_on_prefill_engine_ms']:.1f} ms, same process and GPU as P/D's prefill) P/D adds "
                      f"{t['pd_added_vs_prefill_engine_ms']:.1f} ms (first token equal: {t['first_token_equal']})"
                      + (f"; the NIXL READ itself {t['nixl_read_ms_mean']:.2f} ms." if "nixl_read_ms_mean" in t else ".")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
