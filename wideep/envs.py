"""Every environment variable wideep reads, in one table, read when accessed (never at import).

    from wideep import envs
    envs.WIDEEP_DIST_TIMEOUT_S      # the current value, parsed; a bad value raises ConfigError

vLLM's names (VLLM_*) are honored where wideep implements the same concept, so manifests written for
vLLM work unchanged. Platform variables (LWS_*, GROVE_*, KUBERNETES_*) are parsed where the layout
is derived (wideep.parallel.config, wideep.router.k8s), from the mapping they are given.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from wideep.errors import ConfigError


def _str(name: str, default: str | None = None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or default


def _number(name: str, kind: type, default: Any = None) -> Callable[[], Any]:
    def read() -> Any:
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"${name}", f"must be {kind.__name__}, got {raw!r}") from None
    return read


def _int(name: str, default: int | None = None) -> Callable[[], int | None]:
    return _number(name, int, default)


def _float(name: str, default: float | None = None) -> Callable[[], float | None]:
    return _number(name, float, default)


# name -> (reader, what it does)
VARIABLES: dict[str, tuple[Callable[[], Any], str]] = {
    # processes and logging
    "WIDEEP_LOG_LEVEL": (_str("WIDEEP_LOG_LEVEL", "INFO"), "log level of processes started without --log-level"),
    "WIDEEP_THREADS_PER_RANK": (_int("WIDEEP_THREADS_PER_RANK"),
                                "torch intra-op threads of each engine process (wins over OMP_NUM_THREADS)"),
    "OMP_NUM_THREADS": (_int("OMP_NUM_THREADS"), "OpenMP threads; an engine process keeps it when set"),
    # data / expert parallelism
    "WIDEEP_DIST_TIMEOUT_S": (_float("WIDEEP_DIST_TIMEOUT_S", 120.0),
                              "seconds an EP-group collective (and symm_mem_ll's device barrier) may wait for a peer before the "
                              "group is lost"),
    "WIDEEP_HOST_IP": (_str("WIDEEP_HOST_IP"), "address peers dial for this rank's DP-lockstep wake socket"),
    "WIDEEP_STATIC_DECODE_SIZES": (_str("WIDEEP_STATIC_DECODE_SIZES", ""),
                                   "CPU only: decode batch sizes run through the static (graph) path"),
    "WIDEEP_DECODE_ALL2ALL_BACKEND": (_str("WIDEEP_DECODE_ALL2ALL_BACKEND"),
                                      "MoE dispatch backend of static-shape decode steps"),
    "WIDEEP_LOCKSTEP_REPORT": (_str("WIDEEP_LOCKSTEP_REPORT"), "file each DP rank appends its lockstep counts to"),
    "WIDEEP_EPLB_REPORT": (_str("WIDEEP_EPLB_REPORT"), "file EPLB appends its rebalancing records to"),
    # MLA decode kernel
    "WIDEEP_MLA_DECODE": (_str("WIDEEP_MLA_DECODE", "auto"), "MLA decode backend: auto, torch, triton (wideep's kernels "
                          "only) or flashmla (FlashMLA required where it applies)"),
    "WIDEEP_FP8_GEMM_CONFIG": (_str("WIDEEP_FP8_GEMM_CONFIG"),
                               "force the FP8 GEMM tile config: block_m,block_n,num_warps,num_stages"
                               "[,split[,swap[,fuse_quant[,prefetch]]]]"),
    "WIDEEP_MLA_DECODE_CONFIG": (_str("WIDEEP_MLA_DECODE_CONFIG"),
                                 "force the triton tile config: block_h,block_n,num_warps,num_stages[,sv][,f16]"),
    "WIDEEP_MLA_SPLIT_TOKENS": (_str("WIDEEP_MLA_SPLIT_TOKENS", ""),
                                "tokens per split-K chunk of MLA decode (a multiple of 128; default 2048)"),
    "TRITON_INTERPRET": (_str("TRITON_INTERPRET", "0"), "triton's CPU interpreter (1 = on)"),
    # P/D KV transfer (vLLM NixlConnector names as fallbacks)
    "WIDEEP_KV_SIDE_CHANNEL_PORT": (_int("WIDEEP_KV_SIDE_CHANNEL_PORT"), "side-channel base port (rank r: +r)"),
    "VLLM_NIXL_SIDE_CHANNEL_PORT": (_int("VLLM_NIXL_SIDE_CHANNEL_PORT"), "vLLM's name for the side-channel port"),
    "WIDEEP_KV_SIDE_CHANNEL_HOST": (_str("WIDEEP_KV_SIDE_CHANNEL_HOST"), "address consumers dial (the pod IP)"),
    "VLLM_NIXL_SIDE_CHANNEL_HOST": (_str("VLLM_NIXL_SIDE_CHANNEL_HOST"), "vLLM's name for the side-channel host"),
    "WIDEEP_KV_SIDE_CHANNEL_LISTEN_HOST": (_str("WIDEEP_KV_SIDE_CHANNEL_LISTEN_HOST"),
                                           "address the side channel binds (default: 0.0.0.0 when a host is set)"),
    "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": (_float("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", 480.0),
                                        "seconds a producer holds KV blocks nobody read"),
    # unset (None) and empty ("": nothing allowed) differ here, so no `or default`
    "WIDEEP_KV_PEER_ALLOWLIST": (lambda: os.environ.get("WIDEEP_KV_PEER_ALLOWLIST"),
                                 "KV producers a rank may dial: host:port, host:lo-hi, host, a.b.c.d/n "
                                 "(unset: any; empty: none)"),
    # network tier
    "VLLM_API_KEY": (_str("VLLM_API_KEY"), "API key of `wideep serve` when --api-key is not given"),
    "WIDEEP_ENVOY": (_str("WIDEEP_ENVOY"), "path of the envoy binary the router's gateway mode runs"),
    "XDG_CACHE_HOME": (_str("XDG_CACHE_HOME"), "where `wideep up` keeps its state file (default ~/.cache)"),
    "KUBERNETES_SERVICE_HOST": (_str("KUBERNETES_SERVICE_HOST"), "in a pod: the API server the router watches"),
    "KUBERNETES_SERVICE_PORT": (_str("KUBERNETES_SERVICE_PORT", "443"), "in a pod: the API server's port"),
    "HF_HUB_CACHE": (_str("HF_HUB_CACHE"), "Hugging Face hub cache where `wideep serve` finds hub ids and `wideep bench` tokenizers"),
    "HF_HOME": (_str("HF_HOME"), "Hugging Face home (hub cache: $HF_HOME/hub)"),
}


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return VARIABLES[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(VARIABLES)
