"""Hiding EP communication must not change tokens: async scheduling and dual-batch overlap at EP=2/4
(real processes over gloo, uneven load, a rank idle for a while) give EP=1's greedy tokens."""
from __future__ import annotations

import json

import pytest
from ep_helpers import kill_a_rank_mid_generation, run_to_completion

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs
from wideep.engine.dp import STATIC_DECODE_ENV, generate_dp

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [100, 200, 300, 400, 500, 600, 700], [42, 43], [77] * 21]
MAX_TOKENS = 6
SMALL = dict(kv_cache_memory_bytes=4 << 20, max_model_len=128, block_size=16)


def _requests():
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [EngineRequest(f"r{i}", list(p), sp) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[str, list[int]]:
    return run_to_completion(tiny_model_dir, _requests(), **SMALL)


def _run(model_dir, ep, backend, **extra):
    n = len(PROMPTS)
    # uneven: rank 0 gets most prompts, the last rank is idle for a while before its only prompt
    assignment = [0] * (n - 1) + [ep - 1]
    args = EngineArgs(model=str(model_dir), data_parallel_size=ep, all2all_backend=backend, **SMALL, **extra)
    per_request = generate_dp(args, _requests(), assignment=assignment, start_delay_s={ep - 1: 1.0}, timeout_s=240)
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in per_request.items()}


@pytest.mark.slow   # fast sibling: test_dbo_graph_path_ep4_matches_ep1 runs async scheduling under lockstep too
@pytest.mark.timeout(300)
def test_async_scheduling_under_lockstep_matches_ep1(tiny_model_dir, reference, tmp_path, monkeypatch):
    report = tmp_path / "lockstep.jsonl"
    monkeypatch.setenv(STATIC_DECODE_ENV, "1,2,4")     # decode through the static graph path and its padding
    monkeypatch.setenv("WIDEEP_LOCKSTEP_REPORT", str(report))
    assert _run(tiny_model_dir, 2, "allgather_reducescatter", async_scheduling=True) == reference
    a, b = (json.loads(line) for line in report.read_text().splitlines())
    assert a["steps"] == b["steps"] and a["graph_steps"] == b["graph_steps"] > 0


DBO = dict(enable_dbo=True, dbo_decode_token_threshold=1, dbo_prefill_token_threshold=4)


@pytest.mark.timeout(300)
def test_dbo_eager_ep2_matches_ep1(tiny_model_dir, reference, tmp_path, monkeypatch):
    """Every step above the (tiny) thresholds splits: prefill, mixed and decode steps, dummy ranks too."""
    report = tmp_path / "lockstep.jsonl"
    monkeypatch.setenv("WIDEEP_LOCKSTEP_REPORT", str(report))
    assert _run(tiny_model_dir, 2, "allgather_reducescatter", **DBO) == reference
    a, b = (json.loads(line) for line in report.read_text().splitlines())
    assert a["split_steps"] == b["split_steps"] > 0
    assert a["steps"] == b["steps"] > a["split_steps"], "single-sequence decode steps must not split"


@pytest.mark.timeout(400)
def test_dbo_graph_path_ep4_matches_ep1(tiny_model_dir, reference, tmp_path, monkeypatch):
    """EP=4, all_to_all for prefill and the static (graph) decode backend, graphs above the decode
    threshold captured split; two ranks idle the whole time, one idle for a while."""
    report = tmp_path / "lockstep.jsonl"
    monkeypatch.setenv(STATIC_DECODE_ENV, "1,2,4")
    monkeypatch.setenv("WIDEEP_LOCKSTEP_REPORT", str(report))
    assert _run(tiny_model_dir, 4, "all_to_all", async_scheduling=True, **DBO) == reference
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    assert len({(r["steps"], r["split_steps"], r["graph_steps"]) for r in ranks}) == 1
    assert ranks[0]["split_steps"] > 0 and ranks[0]["graph_steps"] > 0


@pytest.mark.timeout(240)
def test_dead_rank_during_split_steps_is_a_lost_ep_group(tiny_model_dir):
    """Every step splits (thresholds 0): a peer killed mid-generation fails a micro-batch's in-flight
    collective, and the survivor reports the lost EP group and exits."""
    from wideep.utils.net import free_port

    base = EngineArgs(model=str(tiny_model_dir), data_parallel_size=2, data_parallel_size_local=2,
                      data_parallel_rpc_port=free_port(), kv_cache_memory_bytes=4 << 20, max_model_len=512,
                      block_size=16, enforce_eager=True, enable_dbo=True, dbo_decode_token_threshold=0,
                      dbo_prefill_token_threshold=0)

    message = kill_a_rank_mid_generation(base)
    assert "lost the EP group" in message, message
