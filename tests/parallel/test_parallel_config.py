"""ParallelConfig from engine flags and from LeaderWorkerSet / Grove pod env."""
from __future__ import annotations

import pytest

from wideep.engine.config import EngineArgs
from wideep.parallel.config import ParallelConfig, ParallelConfigError


def test_from_engine_args_and_local_ranks():
    args = EngineArgs(data_parallel_size=16, data_parallel_size_local=8, data_parallel_start_rank=8,
                      data_parallel_address="leader", data_parallel_rpc_port=5555, all2all_backend="all_to_all")
    cfg = ParallelConfig.from_engine_args(args)
    assert (cfg.ep_size, cfg.ep_rank, cfg.local_rank, cfg.init_method) == (16, 8, 0, "tcp://leader:5555")
    assert cfg.all2all_backend == "all_to_all"
    third = cfg.for_local_rank(3)
    assert (third.ep_rank, third.local_rank) == (11, 3)
    with pytest.raises(ParallelConfigError, match="local rank 8 out of range"):
        cfg.for_local_rank(8)


def test_lws_env():
    env = {"LWS_LEADER_ADDRESS": "wide-ep-0.wide-ep.default", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    cfg = ParallelConfig.from_env(size_local=8, rpc_port=5555, env=env)
    assert (cfg.data_parallel_size, cfg.data_parallel_start_rank, cfg.data_parallel_address) == \
        (16, 8, "wide-ep-0.wide-ep.default")
    leader = ParallelConfig.from_env(size_local=8, env={**env, "LWS_WORKER_INDEX": "0"})
    assert leader.data_parallel_start_rank == 0
    with pytest.raises(ParallelConfigError, match="LWS_WORKER_INDEX=2"):
        ParallelConfig.from_env(size_local=8, env={**env, "LWS_WORKER_INDEX": "2"})
    with pytest.raises(ParallelConfigError, match="LWS_GROUP_SIZE must be an integer"):
        ParallelConfig.from_env(size_local=8, env={**env, "LWS_GROUP_SIZE": "two"})
    assert ParallelConfig.from_env(size_local=8, env={}) is None


def test_grove_env():
    base = {"GROVE_HEADLESS_SERVICE": "dsr1-0.ns.svc.cluster.local", "GROVE_PCSG_TEMPLATE_NUM_PODS": "8"}
    worker = ParallelConfig.from_env(size_local=4, env={**base, "GROVE_PCLQ_NAME": "dsr1-0-decode-sg-0-decode-worker",
                                                        "GROVE_PCLQ_POD_INDEX": "2"})
    assert (worker.data_parallel_size, worker.data_parallel_start_rank) == (32, 12)
    assert worker.data_parallel_address == "dsr1-0-decode-sg-0-decode-leader-0.dsr1-0.ns.svc.cluster.local"
    leader = ParallelConfig.from_env(size_local=4, env={**base, "GROVE_PCLQ_NAME": "dsr1-0-decode-sg-0-decode-leader",
                                                        "GROVE_PCLQ_POD_INDEX": "0"})
    assert (leader.data_parallel_size, leader.data_parallel_start_rank) == (32, 0)
    assert leader.data_parallel_address == "dsr1-0-decode-sg-0-decode-leader-0.dsr1-0.ns.svc.cluster.local"


def test_validation_names_the_field():
    with pytest.raises(ParallelConfigError, match="data_parallel_rank must be in"):
        ParallelConfig(data_parallel_size=2, data_parallel_size_local=2, data_parallel_rank=2)
    with pytest.raises(ParallelConfigError, match="data_parallel_start_rank"):
        ParallelConfig(data_parallel_size=4, data_parallel_size_local=2, data_parallel_start_rank=3)
