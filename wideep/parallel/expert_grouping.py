"""The EP backends' grouping of (row, slot) pairs by local expert lives in wideep.model.moe_permute (the
EP=1 dispatcher in the model package uses it too); this name stays importable for backends written against it."""
from wideep.model.moe_permute import Grouping, group_by_local_expert, pair_rows

__all__ = ["Grouping", "group_by_local_expert", "pair_rows"]
