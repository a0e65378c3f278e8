"""EP=N engines (real processes over gloo) produce exactly the greedy tokens of EP=1 on the tiny model."""
from __future__ import annotations

import json
import shutil

import pytest
from ep_helpers import run_to_completion

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs
from wideep.engine.dp import generate_dp

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [100, 200, 300, 400, 500, 600, 700], [42, 43]]
MAX_TOKENS = 5
SMALL = dict(kv_cache_memory_bytes=4 << 20, max_model_len=128, block_size=16)


def _requests():
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [EngineRequest(f"r{i}", list(p), sp) for i, p in enumerate(PROMPTS)]


def _tokens(per_request) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in per_request.items()}


def _reference(model_dir) -> dict[str, list[int]]:
    return run_to_completion(model_dir, _requests(), **SMALL)


@pytest.fixture(scope="module")
def skewed_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a router bias that sends most tokens to experts 0-3 (a hot expert group)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-skewed")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(shard)
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            bias = torch.zeros_like(t)
            bias[:4] = 1.0
            bias[4:6] = 0.5
            tensors[name] = bias
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def references(tiny_model_dir, skewed_model_dir):
    return {"uniform": (tiny_model_dir, _reference(tiny_model_dir)),
            "skewed": (skewed_model_dir, _reference(skewed_model_dir))}


def _run(model_dir, ep, backend, **extra):
    n = len(PROMPTS)
    # uneven on purpose: rank 0 gets most prompts, the last rank waits a while before its only prompt
    assignment = [0] * (n - 1) + [ep - 1]
    args = EngineArgs(model=str(model_dir), data_parallel_size=ep, all2all_backend=backend, **SMALL, **extra)
    return _tokens(generate_dp(args, _requests(), assignment=assignment, start_delay_s={ep - 1: 1.5},
                               timeout_s=240))


CASES = [
    pytest.param(2, "allgather_reducescatter", "uniform"),
    pytest.param(4, "all_to_all", "skewed"),
    pytest.param(2, "all_to_all", "skewed", marks=pytest.mark.slow),
    pytest.param(4, "all_to_all", "uniform", marks=pytest.mark.slow),
    pytest.param(4, "allgather_reducescatter", "skewed", marks=pytest.mark.slow),
    pytest.param(2, "all_to_all", "uniform", marks=pytest.mark.slow),
    pytest.param(2, "allgather_reducescatter", "skewed", marks=pytest.mark.slow),
    pytest.param(4, "allgather_reducescatter", "uniform", marks=pytest.mark.slow),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ep,backend,router", CASES)
def test_ep_matches_ep1(references, ep, backend, router):
    model_dir, ref = references[router]
    assert _run(model_dir, ep, backend) == ref


@pytest.mark.timeout(300)
def test_eplb_rebalance_mid_generation_keeps_tokens(references, tmp_path, monkeypatch):
    model_dir, ref = references["skewed"]
    report = tmp_path / "eplb.jsonl"
    monkeypatch.setenv("WIDEEP_EPLB_REPORT", str(report))
    got = _run(model_dir, 2, "all_to_all", enable_eplb=True,
               eplb_config={"window_size": 4, "step_interval": 3, "num_redundant_experts": 2})
    assert got == ref
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    assert {r["rank"] for r in reports} == {0, 1}
    assert sum(r["moved_experts"] for r in reports) > 0, "rebalance never moved an expert"


@pytest.mark.slow  # the message itself is unit-tested in test_eplb.py
def test_eplb_bad_redundant_count_is_a_clear_error(tiny_model_dir):
    from wideep.engine.dp import DPRunError

    args = EngineArgs(model=str(tiny_model_dir), data_parallel_size=2, enable_eplb=True,
                      eplb_config={"num_redundant_experts": 1}, **SMALL)
    with pytest.raises(DPRunError, match="must be divisible by the EP size"):
        generate_dp(args, _requests()[:1], timeout_s=120)


# The CUDA-graph decode path on CPU: eager stand-ins of the static graph sizes, so every decode step
# goes through the per-step size agreement, padding to the agreed size, static-shape dispatch (the
# graph backend even when all_to_all is configured) and dummy ranks replaying the same size.
# With sizes "1,2" rank 0's 3-sequence decode steps exceed the largest graph: eager on every rank.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,sizes", [("allgather_reducescatter", "1,2,4"), ("all_to_all", "1,2")])
def test_ep_graph_path_matches_ep1(references, tmp_path, monkeypatch, backend, sizes):
    from wideep.engine.dp import STATIC_DECODE_ENV

    model_dir, ref = references["uniform"]
    report = tmp_path / "lockstep.jsonl"
    monkeypatch.setenv(STATIC_DECODE_ENV, sizes)
    monkeypatch.setenv("WIDEEP_LOCKSTEP_REPORT", str(report))
    assert _run(model_dir, 2, backend) == ref
    ranks = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    a, b = ranks
    # lockstep: both ranks ran the same forwards, replaying the same graph sizes the same number of times
    assert (a["steps"], a["graph_steps"], a["eager_steps"], a["graph_sizes"]) == \
        (b["steps"], b["graph_steps"], b["eager_steps"], b["graph_sizes"])
    assert a["graph_steps"] > 0, "no decode step replayed a graph"
    assert a["eager_steps"] > 0, "prefill steps must run eagerly"
    assert a["dummy_steps"] + b["dummy_steps"] > 0, "an idle rank never replayed a dummy graph"
    used = {int(s) for s in a["graph_sizes"]}
    assert used <= {int(s) for s in sizes.split(",")}


@pytest.mark.timeout(300)
def test_eplb_rebalance_on_the_graph_path_keeps_tokens(references, tmp_path, monkeypatch):
    """EPLB moves expert weights in place between lockstep steps while decode runs the static graph path."""
    from wideep.engine.dp import STATIC_DECODE_ENV

    model_dir, ref = references["skewed"]
    report = tmp_path / "eplb.jsonl"
    monkeypatch.setenv("WIDEEP_EPLB_REPORT", str(report))
    monkeypatch.setenv(STATIC_DECODE_ENV, "1,2,4")
    got = _run(model_dir, 2, "all_to_all", enable_eplb=True,
               eplb_config={"window_size": 4, "step_interval": 3, "num_redundant_experts": 2})
    assert got == ref
    assert sum(json.loads(line)["moved_experts"] for line in report.read_text().splitlines()) > 0
