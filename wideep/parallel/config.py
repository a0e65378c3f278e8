"""Where this engine rank sits in its DP×EP group, from flags or from the pod's LeaderWorkerSet/Grove env.

Attention is data-parallel and experts are expert-parallel over the same ranks, so one number
(data_parallel_size) is both the DP size and the EP size; tensor parallelism is 1 (docs/protocols.md, "Data and expert parallelism").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

from wideep.errors import ConfigError


class ParallelConfigError(ConfigError):
    """A parallel setting is inconsistent; the message names the field and what to do."""


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = 1          # = EP size (TP is 1)
    data_parallel_size_local: int = 1    # ranks (processes, GPUs) on this host / pod
    data_parallel_start_rank: int = 0    # global rank of this host's first local rank
    data_parallel_rank: int = 0          # global rank of this process
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 29550
    all2all_backend: str = "allgather_reducescatter"
    enable_eplb: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def ep_size(self) -> int:
        return self.data_parallel_size

    @property
    def ep_rank(self) -> int:
        return self.data_parallel_rank

    @property
    def local_rank(self) -> int:
        """Index of this process on its host: picks the GPU (cuda:<local_rank>)."""
        return self.data_parallel_rank - self.data_parallel_start_rank

    @property
    def init_method(self) -> str:
        return f"tcp://{self.data_parallel_address}:{self.data_parallel_rpc_port}"

    def for_local_rank(self, local_rank: int) -> "ParallelConfig":
        """The config of local rank i on this host (what a per-host supervisor hands to child i)."""
        if not 0 <= local_rank < self.data_parallel_size_local:
            raise ParallelConfigError(
                f"local rank {local_rank} out of range for data_parallel_size_local={self.data_parallel_size_local}")
        return replace(self, data_parallel_rank=self.data_parallel_start_rank + local_rank)

    def validate(self) -> None:
        def need(cond: bool, field: str, why: str) -> None:
            if not cond:
                raise ParallelConfigError(f"{field} {why} (got {getattr(self, field)!r})")

        need(isinstance(self.data_parallel_size, int) and self.data_parallel_size >= 1,
             "data_parallel_size", "must be an integer >= 1")
        need(isinstance(self.data_parallel_size_local, int)
             and 1 <= self.data_parallel_size_local <= self.data_parallel_size,
             "data_parallel_size_local", f"must be in [1, data_parallel_size={self.data_parallel_size}]")
        need(isinstance(self.data_parallel_start_rank, int)
             and 0 <= self.data_parallel_start_rank
             and self.data_parallel_start_rank + self.data_parallel_size_local <= self.data_parallel_size,
             "data_parallel_start_rank",
             f"must satisfy 0 <= start_rank and start_rank + size_local ({self.data_parallel_size_local}) "
             f"<= data_parallel_size ({self.data_parallel_size})")
        need(isinstance(self.data_parallel_rank, int) and 0 <= self.data_parallel_rank < self.data_parallel_size,
             "data_parallel_rank", f"must be in [0, data_parallel_size={self.data_parallel_size})")
        need(isinstance(self.data_parallel_rpc_port, int) and 0 < self.data_parallel_rpc_port < 65536,
             "data_parallel_rpc_port", "must be a TCP port")
        need(bool(self.data_parallel_address), "data_parallel_address", "must be a host name or IP")

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_engine_args(cls, args: Any) -> "ParallelConfig":
        """From wideep.engine.config.EngineArgs (or anything with the same attribute names)."""
        size_local = min(args.data_parallel_size_local, args.data_parallel_size)
        start = args.data_parallel_start_rank
        rank = args.data_parallel_rank
        # A rank below this host's start rank means "not set": use this host's first rank.
        if rank < start:
            rank = start
        return cls(
            data_parallel_size=args.data_parallel_size,
            data_parallel_size_local=size_local,
            data_parallel_start_rank=start,
            data_parallel_rank=rank,
            data_parallel_address=args.data_parallel_address,
            data_parallel_rpc_port=args.data_parallel_rpc_port,
            all2all_backend=args.all2all_backend,
            enable_eplb=args.enable_eplb,
        )

    @classmethod
    def from_env(cls, size_local: int, rpc_port: int = 29550, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> "ParallelConfig | None":
        """From the LeaderWorkerSet or Grove env of this pod; None when neither is present.

        LWS: size = LWS_GROUP_SIZE*size_local, start = LWS_WORKER_INDEX*size_local,
        leader = LWS_LEADER_ADDRESS.  Grove: a scaling group of a leader clique and a
        worker clique; size = GROVE_PCSG_TEMPLATE_NUM_PODS*size_local, start = 0 on the leader and
        (GROVE_PCLQ_POD_INDEX+1)*size_local on workers, leader = "<pclq with worker→leader>-0.<headless svc>".
        """
        env = os.environ if env is None else env
        layout = layout_from_env(env, size_local)
        if layout is None:
            return None
        size, start, address = layout
        return cls(data_parallel_size=size, data_parallel_size_local=size_local, data_parallel_start_rank=start,
                   data_parallel_rank=start, data_parallel_address=address, data_parallel_rpc_port=rpc_port,
                   **overrides)


def layout_from_env(env: Mapping[str, str], size_local: int) -> tuple[int, int, str] | None:
    """(data_parallel_size, start_rank, leader_address) from LWS or Grove env vars, or None."""
    def as_int(name: str) -> int:
        raw = env.get(name, "")
        try:
            return int(raw)
        except ValueError:
            raise ParallelConfigError(f"environment variable {name} must be an integer (got {raw!r})") from None

    if env.get("LWS_LEADER_ADDRESS"):
        group_size = as_int("LWS_GROUP_SIZE") if env.get("LWS_GROUP_SIZE") else 1
        worker_index = as_int("LWS_WORKER_INDEX") if env.get("LWS_WORKER_INDEX") else 0
        if not 0 <= worker_index < group_size:
            raise ParallelConfigError(
                f"LWS_WORKER_INDEX={worker_index} must be in [0, LWS_GROUP_SIZE={group_size})")
        return group_size * size_local, worker_index * size_local, env["LWS_LEADER_ADDRESS"]

    if env.get("GROVE_PCLQ_NAME") and env.get("GROVE_HEADLESS_SERVICE"):
        pclq = env["GROVE_PCLQ_NAME"]
        service = env["GROVE_HEADLESS_SERVICE"]
        num_pods = as_int("GROVE_PCSG_TEMPLATE_NUM_PODS") if env.get("GROVE_PCSG_TEMPLATE_NUM_PODS") else 1
        pod_index = as_int("GROVE_PCLQ_POD_INDEX") if env.get("GROVE_PCLQ_POD_INDEX") else 0
        is_worker = pclq.endswith("worker") or "-worker" in pclq
        leader_clique = pclq.replace("worker", "leader") if is_worker else pclq
        start = (pod_index + 1) * size_local if is_worker else 0
        if start + size_local > num_pods * size_local:
            raise ParallelConfigError(
                f"GROVE_PCLQ_POD_INDEX={pod_index} does not fit GROVE_PCSG_TEMPLATE_NUM_PODS={num_pods} "
                f"(worker pod index + 1 must be < num pods)")
        return num_pods * size_local, start, f"{leader_clique}-0.{service}"
    return None
