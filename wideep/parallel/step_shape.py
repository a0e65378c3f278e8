"""Per-step agreement of an EP group on one forward shape: which CUDA graph every rank replays, or eager.

The MoE layers of a forward are collectives, so every rank must run the same kind of forward with
the same padded token count. Each rank proposes what it could run (vLLM's coordinate_batch_across_dp,
docs/protocols.md, "DP lockstep"); the proposals travel in the DP lockstep's per-step MAX all-reduce, so they are encoded
as "bigger wins" integers:
- tokens: the rank's token count (a dummy batch counts as `dummy_tokens`);
- needs_eager: 1 if the rank cannot replay a graph this step (prefill or mixed batch, or no graphs):
  the minimum cudagraph mode wins, one eager rank makes the whole step eager;
- prefill: 1 if the rank's batch is not decode-only (tells decode steps that run eagerly, e.g. with
  enforce_eager, from prefill/mixed steps in the step-time report).
With graphs, every rank (dummy ranks too) replays the smallest captured size >= the group's max
tokens; a step bigger than the largest graph runs eagerly everywhere.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class StepProposal:
    """What one rank would run this step."""

    tokens: int                 # real tokens scheduled, or the dummy batch size when idle
    graphable: bool             # decode-only (or a dummy batch) and this rank has graphs captured
    unfinished: bool = True     # this rank still has requests (the wave goes on while any rank does)
    prefill: bool = False       # the batch has prefill tokens (not decode-only)

    def encode(self) -> list[int]:
        """The all-reduce(MAX) payload: [unfinished, tokens, needs_eager, prefill]."""
        return [int(self.unfinished), int(self.tokens), int(not self.graphable), int(self.prefill)]


@dataclass(frozen=True)
class StepShape:
    """The group's decision, identical on every rank."""

    any_unfinished: bool        # False: everyone is idle, the wave ends and nobody steps
    max_tokens: int             # the group's max tokens per rank (eager dispatchers pad to it)
    graph_size: int | None      # the CUDA graph every rank replays; None = eager on every rank
    decode_only: bool = True    # no rank has prefill tokens this step

    @property
    def eager(self) -> bool:
        return self.graph_size is None


def decide_shape(reduced: Sequence[int], graph_sizes: Iterable[int]) -> StepShape:
    """The group's StepShape from the element-wise MAX of all ranks' `StepProposal.encode()`.

    `graph_sizes`: the captured batch sizes, the same on every rank (empty: no graphs, always eager).
    """
    unfinished, max_tokens, needs_eager, prefill = (int(v) for v in reduced)
    sizes = sorted(graph_sizes)
    size = None
    if not needs_eager and sizes:
        i = bisect_left(sizes, max_tokens)
        size = sizes[i] if i < len(sizes) else None   # over the largest graph: eager
    return StepShape(any_unfinished=bool(unfinished), max_tokens=max_tokens, graph_size=size,
                     decode_only=not prefill)


def agree(proposals: Sequence[StepProposal], graph_sizes: Iterable[int]) -> StepShape:
    """What the all-reduce computes, in one process (tests, simulations)."""
    if not proposals:
        raise ValueError("agree() needs at least one rank's proposal")
    enc = [p.encode() for p in proposals]
    return decide_shape([max(col) for col in zip(*enc)], graph_sizes)
