"""Review: malformed remote-prefill params reaching a consumer must fail that one request (blocks
freed, an error output), never park it forever nor kill the engine loop.

kv_transfer_params is client-controlled (the router or any client sends it through the HTTP API),
so a bad port or a non-integer tp_size is input, not an invariant."""
from __future__ import annotations

import time

import pytest
import torch

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.block_manager import BlockManager
from wideep.engine.request import Request
from wideep.engine.scheduler import Scheduler
from wideep.kv_transfer.connector import KVConnector
from wideep.kv_transfer.params import KVTransferConfig
from wideep.utils.net import free_port

BLOCK = 4


@pytest.fixture
def consumer():
    cfg = KVTransferConfig(kv_role="kv_consumer", kv_load_failure_policy="fail", engine_id="review-d")
    conn = KVConnector(cfg, model="toy", block_size=BLOCK, host="127.0.0.1", port=free_port(),
                       listen_host="127.0.0.1", timeout_s=30.0)
    conn.register_kv_caches([torch.zeros(32, BLOCK, 2)])
    bm = BlockManager(32, BLOCK, True)
    sched = Scheduler(bm, 8, 64, 512, conn)
    yield sched, bm
    conn.shutdown()


def _params(**over):
    p = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [0, 1, 2],
         "remote_engine_id": "p-engine", "remote_request_id": "x", "remote_host": "127.0.0.1",
         "remote_port": free_port(), "tp_size": 1}
    p.update(over)
    return p


def _outcome(sched: Scheduler, bm: BlockManager, rid: str, limit_s: float = 10.0):
    """Drives the scheduler as the engine loop does until `rid` reports a final output."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = sched.schedule()
        for o in sched.update(out, [7] * len(out.seqs)):
            if o.request_id == rid and o.finished:
                return o
        time.sleep(0.01)
    raise AssertionError(f"{rid} never finished: parked in WAITING_FOR_REMOTE_KV "
                         f"({rid in sched.waiting_for_kv}), {bm.num_blocks - bm.num_free_blocks} blocks in use")


@pytest.mark.parametrize("over", [{"remote_port": 70000}, {"remote_port": -5}, {"remote_host": "bad\x00host"},
                                  {"remote_host": "a" * 300}, {"tp_size": [1]}, {"tp_size": {"a": 1}}])
def test_malformed_remote_params_fail_the_request_and_free_its_blocks(consumer, over):
    sched, bm = consumer
    rid = "bad-params"
    sched.add(Request(EngineRequest(rid, list(range(10)), SamplingParams(max_tokens=2, temperature=0),
                                    _params(**over)), set(), 2))
    final = _outcome(sched, bm, rid)
    assert final.finish_reason == "error" and final.error
    assert bm.num_free_blocks == bm.num_blocks and not sched.held and not sched.waiting_for_kv
