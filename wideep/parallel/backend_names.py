"""vLLM / llm-d MoE all2all backend names mapped onto the closest wideep backend (torch-free, so
`wideep serve` can say at startup which backend a manifest's name really runs). DeepEP low-latency is
a registered backend of its own (it picks and logs its implementation at startup)."""
from __future__ import annotations

ALIASES = {
    "naive": "allgather_reducescatter",
    "allgather": "allgather_reducescatter",
    "deepep_high_throughput": "all_to_all",
    "pplx": "all_to_all",
}
