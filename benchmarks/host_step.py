"""Host time per decode step of the engine loop, piece by piece (measured on the CPU).

On a GPU the decode forward is one CUDA graph replay; what the host does around it (schedule the step,
stage its inputs, launch the sampler, take the tokens back, apply them) is time the device waits for in
a synchronous loop and the budget async scheduling must stay under. This runs the real engine
(EngineCore.step(): schedule -> launch -> apply) over B running decodes of ctx tokens on a small model
on the CPU, with the static-shape decode path (the same buffers and staging a CUDA graph uses, replayed
eagerly), and times each host piece apart from the model's forward and the sampler's math:

  schedule      Scheduler.schedule
  stage_inputs  ModelRunner._replay minus the forward: ids, positions, slots, seq lens, block tables
                (--eager: ModelRunner._prepare, the eager path's inputs)
  forward       the static decode forward (the graph replay on a GPU; CPU compute here, not host work;
                skipped unless --forward: the CPU forward only evicts the host's caches between pieces)
  logits        lm_head (device work on a GPU)
  sample        Sampler.sample (torch ops on the logits; host-side lists and launches)
  launch_other  the rest of ModelRunner.launch (sample rows, PendingTokens)
  result        PendingTokens.result (the tokens to a Python list)
  update        Scheduler.update (append tokens, stop checks, outputs)
  publish       the step's outputs encoded for the frontend (wire.encode), as the engine process sends them

The model is tiny with a small vocabulary (the forward and sampling math are cheap and counted apart);
the host pieces depend on B, the blocks per sequence and the engine's Python, not on the model's size.

  python benchmarks/host_step.py --batch 128 --ctx 2048                      # synchronous loop
  python benchmarks/host_step.py --batch 128 --ctx 2048 --async-scheduling   # async scheduling
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wideep.engine import model_runner as mr  # noqa: E402
from wideep.engine.api import EngineRequest, SamplingParams  # noqa: E402
from wideep.engine.config import EngineArgs  # noqa: E402
from wideep.engine.core import EngineCore  # noqa: E402
from wideep.engine.request import Request, RequestStatus  # noqa: E402
from wideep.engine.wire import Outputs, encode  # noqa: E402
from wideep.model.config import ModelConfig  # noqa: E402
from wideep.model.deepseek_v3 import DeepseekV3ForCausalLM, materialize  # noqa: E402
from wideep.model.local_dispatch import LocalDispatcher  # noqa: E402
from wideep.model.make_model import PRESETS  # noqa: E402
from wideep.model.rope import RotaryEmbedding  # noqa: E402

PIECES = ("schedule", "stage_inputs", "forward", "logits", "sample", "launch_other", "result", "update", "publish")
HOST = ("schedule", "stage_inputs", "sample", "launch_other", "result", "update", "publish")


class Timers:
    """Accumulates perf_counter time per piece by wrapping methods of the engine's objects."""

    def __init__(self):
        self.t = {k: 0.0 for k in PIECES + ("replay", "launch", "step", "prepare", "eager_forward")}

    def wrap(self, obj, name: str, key: str):
        fn = getattr(obj, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0
        setattr(obj, name, timed)

    def reset(self):
        for k in self.t:
            self.t[k] = 0.0


def build_core(a) -> EngineCore:
    fields = dict(PRESETS["tiny"])
    fields.update(vocab_size=a.vocab, num_hidden_layers=a.layers)
    cfg = ModelConfig(**fields, torch_dtype="float32")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, LocalDispatcher(cfg.n_routed_experts), cfg.n_routed_experts)
    materialize(model, torch.device("cpu"), torch.float32)
    model.model.rotary_emb = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    blocks = a.batch * (-(-(a.ctx + a.steps + 16) // a.block_size)) + 8
    per_block = cfg.num_hidden_layers * a.block_size * cfg.kv_cache_dim * 4
    args = EngineArgs(device="cpu", dtype="float32", block_size=a.block_size, max_num_seqs=a.batch,
                      max_num_batched_tokens=max(a.batch, 256), max_model_len=a.ctx + a.steps + 16,
                      kv_cache_memory_bytes=blocks * per_block, enable_prefix_caching=False,
                      async_scheduling=a.async_scheduling, seed=0)
    core = EngineCore(args, model=model)
    if not a.eager:
        core.runner.use_static_decode([a.batch])   # the CUDA-graph input path (static buffers, staging), eager
    return core


def admit(core: EngineCore, a) -> list[Request]:
    """B requests of ctx known tokens, ctx-1 of them with KV: running decodes from the first step on."""
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i in range(a.batch):
        ids = torch.randint(10, a.vocab, (a.ctx,), generator=g).tolist()
        sp = SamplingParams(max_tokens=1 << 20, temperature=a.temperature, ignore_eos=True)
        r = Request(EngineRequest(f"h{i}", ids, sp), set(), 1 << 20)
        assert core.block_manager.allocate(r, a.ctx)
        r.num_computed_tokens = a.ctx - 1
        r.status = RequestStatus.RUNNING
        core.scheduler.requests[r.request_id] = r
        core.scheduler.running.append(r)
        reqs.append(r)
    return reqs


def run(a) -> dict:
    torch.set_num_threads(1)
    core = build_core(a)
    runner = core.runner
    if not a.forward:   # the GPU runs it; on the CPU it would only evict the host's caches between pieces
        runner._replay_graph = lambda g, num_real: None
        hidden = torch.zeros(a.batch, runner.model.config.hidden_size)
        runner._forward = lambda ids, pos, attn, decode_only, dbo_group=None: hidden[:ids.shape[0]]
    tm = Timers()
    tm.wrap(runner, "_prepare", "prepare")
    tm.wrap(runner, "_forward", "eager_forward")
    tm.wrap(core.scheduler, "schedule", "schedule")
    tm.wrap(core.scheduler, "update", "update")
    tm.wrap(runner, "_replay", "replay")
    tm.wrap(runner, "_replay_graph", "forward")
    tm.wrap(runner, "launch", "launch")
    tm.wrap(runner.model, "compute_logits", "logits")
    tm.wrap(runner.sampler, "sample", "sample")
    orig_result = mr.PendingTokens.result

    def result(self):
        t0 = time.perf_counter()
        try:
            return orig_result(self)
        finally:
            tm.t["result"] += time.perf_counter() - t0
    free0 = core.num_free_blocks
    reqs = admit(core, a)
    per_step: dict[str, list[float]] = {k: [] for k in PIECES + ("step",)}
    with _patched(mr.PendingTokens, "result", result):
        for i in range(a.warmup + a.steps):
            tm.reset()
            t0 = time.perf_counter()
            outs = core.step()
            tm.t["step"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            encode(Outputs(outs, None))
            tm.t["publish"] = time.perf_counter() - t1
            assert a.async_scheduling and i == 0 or sum(len(o.new_token_ids) for o in outs) == a.batch
            if i < a.warmup:
                continue
            t = dict(tm.t)
            if a.eager:     # the eager path: _prepare builds the inputs, _forward runs the model
                t["stage_inputs"] = t["prepare"]
                t["forward"] = t["eager_forward"]
                t["launch_other"] = t["launch"] - t["prepare"] - t["eager_forward"] - t["logits"] - t["sample"]
            else:
                t["stage_inputs"] = t["replay"] - t["forward"]
                t["launch_other"] = t["launch"] - t["replay"] - t["logits"] - t["sample"]
            for k in per_step:
                per_step[k].append(t[k])
        for r in reqs:
            core.abort_request(r.request_id)
        core.step()
    assert core.num_free_blocks == free0 and not core.has_unfinished()
    med = {k: statistics.median(v) * 1e6 for k, v in per_step.items()}
    med["host_total"] = sum(med[k] for k in HOST)
    return med


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="timed engine steps (medians reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--vocab", type=int, default=16, help="small: the sampler's math (device work on a GPU) stays "
                   "negligible on the CPU, so `sample` is its host side")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--forward", action="store_true", help="run the decode forward too (default: skipped, its "
                   "hidden states are the last ones; the host pieces do not depend on their values)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--eager", action="store_true", help="the eager input path (ModelRunner._prepare: prefill, mixed "
                   "and eager decode batches) instead of the CUDA-graph one")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a)
    res["argv"] = sys.argv[1:] if argv is None else argv
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# B={a.batch} ctx={a.ctx} block={a.block_size} async={a.async_scheduling} forward={a.forward} "
          f"eager={a.eager}  "
          f"median us per step over {a.steps} steps, {res['date']}")
    for k in PIECES + ("host_total", "step"):
        print(f"{k:14s} {res[k]:10.1f}{'' if k in HOST or k in ('host_total', 'step') else '   (not host work on a GPU)'}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
