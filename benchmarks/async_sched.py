"""Host time per engine step with and without --async-scheduling (one rank, decode steady state).

Runs B greedy requests to steady decode on an EngineCore, then times N decode steps:
  wall  - time per core.step()
  wait  - time the host blocked waiting for the device's sampled tokens (the runner's event wait)
  host  - wall - wait: scheduling, input preparation, kernel launches / graph replay, output handling
Synchronous scheduling pays host + device back to back; async overlaps the host work of step n+1
with the device's step n, so wall approaches max(host, device). Both modes must produce the same
tokens (checked). On CPU the forward itself is host work, so nothing can overlap: the CPU figure
shows the bookkeeping cost of async scheduling, the GPU figure its gain.

  python benchmarks/async_sched.py --batch 32 --steps 64            # tiny model made on the fly
  python benchmarks/async_sched.py --model DIR --batch 128 --out x.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _measure(model: str, async_scheduling: bool, batch: int, steps: int, prompt_len: int, device: str,
             enforce_eager: bool) -> dict:
    import torch

    from wideep.engine.api import EngineRequest, SamplingParams
    from wideep.engine.config import EngineArgs
    from wideep.engine.core import EngineCore

    sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, batch})
    core = EngineCore(EngineArgs(model=model, async_scheduling=async_scheduling, max_num_seqs=batch,
                                 max_num_batched_tokens=max(2048, batch * prompt_len), block_size=16,
                                 kv_cache_memory_bytes=512 << 20, device=device, enforce_eager=enforce_eager,
                                 cuda_graph_sizes=sizes, max_model_len=prompt_len + steps + 64))
    sp = SamplingParams(max_tokens=steps + 32, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(2, core.vocab_size, (prompt_len,), generator=g).tolist()
        core.add_request(EngineRequest(f"r{i}", ids, sp))
    tokens: dict[str, list[int]] = {}

    def step():
        for o in core.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)

    for _ in range(8):           # prefill + a few decode steps (graphs warm)
        step()
    wait0 = core.runner.wait_s
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    wait = (core.runner.wait_s - wait0) / steps
    while core.has_unfinished():
        step()
    return {"async_scheduling": async_scheduling, "wall_ms": wall * 1e3, "wait_ms": wait * 1e3,
            "host_ms": (wall - wait) * 1e3, "device": str(core.device), "graphs": sorted(core.runner.graphs),
            "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the tiny preset, made in a temp dir)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    if a.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)
    model = a.model
    if model is None:
        from wideep.model.make_model import make_model

        model = tempfile.mkdtemp(prefix="wideep-tiny-")
        make_model("tiny", Path(model))
    rows = [_measure(model, mode, a.batch, a.steps, a.prompt_len, a.device, a.enforce_eager) for mode in (False, True)]
    same = rows[0].pop("tokens") == rows[1].pop("tokens")
    for r in rows:
        print(f"{'async' if r['async_scheduling'] else 'sync '}: {r['wall_ms']:.2f} ms/step wall, "
              f"{r['host_ms']:.2f} ms host, {r['wait_ms']:.2f} ms waiting for the device ({r['device']}, B={a.batch})")
    print(f"tokens identical: {same}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"batch": a.batch, "steps": a.steps, "results": rows, "tokens_identical": same},
                                    indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
