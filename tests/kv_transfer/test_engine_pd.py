"""P/D at the EngineCore level with the tiny DeepSeek-V3: a producer core, a consumer core and an
aggregated core in one process, KV moving over the real TCP side channel between them."""
from __future__ import annotations

import time

import pytest

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs
from wideep.engine.core import EngineCore
from wideep.kv_transfer.params import PREFILL_LEG_PARAMS
from wideep.utils.net import free_port_range

BLOCK = 16


def _core(model_dir, role: str | None, dp_rank: int = 0, policy: str = "fail") -> EngineCore:
    kv = {"kv_connector": "NixlConnector", "kv_role": role, "kv_load_failure_policy": policy,
          "kv_connector_extra_config": {"enable_cross_layers_blocks": True}} if role else None
    return EngineCore(EngineArgs(model=str(model_dir), block_size=BLOCK, kv_cache_memory_bytes=4 << 20,
                                 enforce_eager=True, data_parallel_rank=dp_rank, kv_transfer_config=kv))


def _run(core: EngineCore, rid: str, prompt, max_tokens, params=None, limit_s: float = 60.0):
    core.add_request(EngineRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), params))
    toks, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        core.poll_kv_transfers()
        for o in core.step():
            if o.request_id == rid:
                toks += o.new_token_ids
                if o.finished:
                    return toks, o
        if core.kv_transfer_wait_s() is not None:
            time.sleep(0.002)
    raise AssertionError(f"{rid} did not finish")


def _settle(core: EngineCore, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while core.kv_transfer_wait_s() is not None and time.monotonic() < deadline:
        core.poll_kv_transfers()
        time.sleep(0.005)


@pytest.fixture(scope="module")
def cores(tiny_model_dir):
    import os
    old = os.environ.get("WIDEEP_KV_SIDE_CHANNEL_PORT")
    os.environ["WIDEEP_KV_SIDE_CHANNEL_PORT"] = str(free_port_range(2))
    try:
        made = {"agg": _core(tiny_model_dir, None), "p": _core(tiny_model_dir, "kv_producer", dp_rank=1),
                "d": _core(tiny_model_dir, "kv_consumer", policy="recompute")}
    finally:
        if old is None:
            os.environ.pop("WIDEEP_KV_SIDE_CHANNEL_PORT")
        else:
            os.environ["WIDEEP_KV_SIDE_CHANNEL_PORT"] = old
    yield made
    for c in made.values():
        if c.connector is not None:
            c.connector.shutdown()


@pytest.mark.parametrize("plen", [5, 16, 41])
def test_engine_pd_greedy_equals_aggregated(cores, plen):
    agg, p, d = cores["agg"], cores["p"], cores["d"]
    # over NIXL both P/D cores allocate the cross-layer (block-major) cache: the tiny model's prefill,
    # cache writes and decode run on strided per-layer views; the aggregated core keeps per-layer tensors
    for c in (p, d):
        assert c.connector.caches.block_major == c.connector.use_nixl
    assert agg.runner.kv_caches[0].is_contiguous()
    prompt = [(i * 37 + 11) % 900 + 3 for i in range(plen)]
    want, _ = _run(agg, f"agg{plen}", prompt, 8)
    first, pout = _run(p, f"p{plen}", prompt, 1, dict(PREFILL_LEG_PARAMS))
    params = pout.kv_transfer_params
    assert first == want[:1] and pout.finish_reason == "length"
    assert params["remote_engine_id"].endswith("_dp1") and params["do_remote_prefill"] is True
    assert params["remote_request_id"] == f"p{plen}" and len(params["remote_block_ids"]) == -(-plen // BLOCK)
    assert p.stats().kv_cache_usage > 0          # held for the consumer
    got, dout = _run(d, f"d{plen}", prompt, 8, params)
    assert got == want
    assert dout.num_cached_tokens == plen - 1
    _settle(p)
    _settle(d)
    assert p.stats().kv_cache_usage == 0 and d.stats().kv_cache_usage == 0
    assert d.connector.stats["bytes_received"] > 0


def test_engine_pd_read_failure_recomputes(cores):
    agg, p, d = cores["agg"], cores["p"], cores["d"]
    prompt = list(range(100, 140))
    want, _ = _run(agg, "agg-f", prompt, 5)
    _, pout = _run(p, "p-f", prompt, 1, dict(PREFILL_LEG_PARAMS))
    params = dict(pout.kv_transfer_params, remote_engine_id="gone_dp1")   # a restarted producer
    failed_before = d.connector.stats["loads_failed"]
    got, _ = _run(d, "d-f", prompt, 5, params)
    assert got == want and d.connector.stats["loads_failed"] == failed_before + 1
    _settle(d)
    assert d.stats().kv_cache_usage == 0
    # the producer still holds the blocks (nobody read them): free them as a consumer release would
    p.connector.release(pout.kv_transfer_params["remote_engine_id"], "p-f", after_read=False)
    _settle(p)
    assert p.stats().kv_cache_usage == 0


def test_engine_pd_partial_prefix_hit_reads_only_the_tail(cores):
    """The decode engine already caches the prompt's first two blocks: P/D pulls only the rest
    (over NIXL when installed, NixlConnector's default) and still equals the aggregated run."""
    agg, p, d = cores["agg"], cores["p"], cores["d"]
    prompt = [(i * 13 + 7) % 900 + 3 for i in range(45)]
    want, _ = _run(agg, "agg-pp", prompt, 6)
    _run(d, "d-warm", prompt[:2 * BLOCK + 3], 1)          # caches blocks 0 and 1 of the prompt
    _settle(d)
    received = d.connector.stats["blocks_received"]
    _, pout = _run(p, "p-pp", prompt, 1, dict(PREFILL_LEG_PARAMS))
    got, dout = _run(d, "d-pp", prompt, 6, pout.kv_transfer_params)
    assert got == want
    assert dout.num_cached_tokens == len(prompt) - 1
    assert d.connector.stats["blocks_received"] - received == 1   # block 2 (tokens 32..43)
    _settle(p)
    _settle(d)
    assert p.stats().kv_cache_usage == 0
