"""symm_mem_ll on 2 GPUs: what the engine relies on outside a steady decode step.

1. A forward outside the DP lockstep (no max tokens per rank set, as in the engine's start-up memory profile)
   agrees on its bound by itself.
2. A step past the receive buffers' capacity grows them; the old ones are retired, not freed (CUDA graphs
   captured before still use them), and the results equal the smaller step's.
3. A peer that dies between steps: the survivor's device barrier gives up after WIDEEP_DIST_TIMEOUT_S (set to
   5 s here) and the survivor gets an error, instead of waiting forever.

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      timeout 120 python benchmarks/ep_dead_peer_check.py

Prints `EP_DEAD_PEER_CHECK PASS` or `EP_DEAD_PEER_CHECK FAIL: <why>`; exit code 0 only on PASS.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMEOUT_S = 5
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
       "WIDEEP_DIST_TIMEOUT_S": str(TIMEOUT_S)}


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(ENV)
    import torch
    import torch.distributed as dist

    from wideep.parallel.symm_dispatch import SymmMemDispatcher

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    d = SymmMemDispatcher(16, rank, 2, None, capacity=256)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.randint(0, 16, (64, 4), device="cuda", generator=g)
    w = torch.rand(64, 4, device="cuda", generator=g)

    def step():
        r = d.dispatch(x, ids, w)
        return d.combine(r.x * r.weights[:, None].to(r.x.dtype), r)

    unset = step()                         # 1: no bound set
    d.set_max_tokens_per_rank(300)         # 2: past the 256-token buffers
    grown = step()
    torch.cuda.synchronize()
    results.put((rank, "grown", (d.capacity, len(d._retired), bool(torch.equal(unset, grown)))))
    if rank == 1:
        results.close()
        results.join_thread()
        os._exit(0)                        # 3: dies before the next step
    t0 = time.time()
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        results.put((rank, "survivor", ("no error", time.time() - t0)))
    except Exception as exc:  # noqa: BLE001 - the error is what this check wants to see
        results.put((rank, "survivor", (f"{type(exc).__name__}: {str(exc)[:160]}", time.time() - t0)))
    results.close()
    results.join_thread()
    os._exit(0)


def main() -> int:
    import multiprocessing as mp

    from wideep.utils.net import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict = {}
    deadline = time.time() + 12 * TIMEOUT_S
    while time.time() < deadline and len(got) < 3:
        try:
            rank, what, value = results.get(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
            continue
        got[(rank, what)] = value
        print(f"rank {rank} {what}: {value}", flush=True)
    hung = []
    for i, p in enumerate(procs):
        p.join(timeout=2)
        if p.is_alive():
            hung.append(i)
            p.kill()
    why = []
    for r in range(2):
        cap, retired, same = got.get((r, "grown"), (0, 0, False))
        if not (cap >= 300 and retired >= 1 and same):
            why.append(f"rank {r}: growing the buffers gave capacity {cap}, {retired} retired, same results {same}")
    err, waited = got.get((0, "survivor"), ("no report", 0.0))
    if err == "no error" or err == "no report" or hung:
        why.append(f"the survivor did not fail within {12 * TIMEOUT_S} s ({err}; processes still running: {hung})")
    if not why:
        print(f"survivor failed after {waited:.1f} s (barrier timeout {TIMEOUT_S} s)", flush=True)
    print("EP_DEAD_PEER_CHECK " + ("PASS" if not why else "FAIL: " + "; ".join(why)), flush=True)
    return 0 if not why else 1


if __name__ == "__main__":
    raise SystemExit(main())
