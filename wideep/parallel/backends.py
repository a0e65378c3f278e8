"""Dispatcher backends by name: the parallel tier registers its implementations of the model's MoE
dispatch seam (wideep.model.dispatch) here; engine assembly asks for one by its (vLLM) name."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from wideep.model.dispatch import MoEDispatcher

# ---- registry: backends register by name; model code asks for one by name only ----------------------

_BACKENDS: dict[str, Callable[..., MoEDispatcher] | str] = {
    # built-ins are imported lazily ("module:Class") so importing this file stays cheap
    "allgather_reducescatter": "wideep.parallel.allgather_dispatch:AllGatherReduceScatterDispatcher",
    "all_to_all": "wideep.parallel.all_to_all_dispatch:AllToAllDispatcher",
    "symm_mem_ll": "wideep.parallel.symm_dispatch:SymmMemDispatcher",
    # vLLM's name: symm_mem_ll on GPUs, allgather_reducescatter on CPU/gloo (logs which one runs)
    "deepep_low_latency": "wideep.parallel.symm_dispatch:make_low_latency_dispatcher",
}
# vLLM / llm-d backend names mapped onto the closest wideep backend (DeepEP low-latency is an all-gather, high-throughput an all-to-all).
ALIASES = {
    "naive": "allgather_reducescatter",
    "allgather": "allgather_reducescatter",
    "deepep_high_throughput": "all_to_all",
    "pplx": "all_to_all",
}


def register_dispatcher(name: str, factory: Callable[..., MoEDispatcher] | str | None = None):
    """Register a backend: `register_dispatcher("x", Cls)`, or as a class decorator `@register_dispatcher("x")`."""
    if factory is not None:
        _BACKENDS[name] = factory
        return factory

    def deco(cls):
        _BACKENDS[name] = cls
        return cls
    return deco


def available_dispatchers() -> list[str]:
    return sorted(_BACKENDS)


def get_dispatcher(name: str, num_experts: int, ep_rank: int = 0, ep_size: int = 1, group: Any = None,
                   **options: Any) -> MoEDispatcher:
    """Instantiate backend `name` (or its vLLM alias) for `num_experts` physical experts over `ep_size` ranks."""
    key = ALIASES.get(name, name)
    if key not in _BACKENDS:
        raise ValueError(f"unknown all2all_backend {name!r}; choose one of {', '.join(available_dispatchers())}")
    factory = _BACKENDS[key]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _BACKENDS[key] = factory
    return factory(num_experts, ep_rank=ep_rank, ep_size=ep_size, group=group, **options)
