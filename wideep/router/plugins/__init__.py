"""Built-in plugins, one module per family; importing a module registers its types."""
from __future__ import annotations

import importlib

FAMILIES = ["profile_handlers", "deciders", "filters", "scorers", "prefix", "precise", "pickers", "producers",
            "affinity", "legacy", "screeners"]


def load_all() -> None:
    for fam in FAMILIES:
        importlib.import_module(f"wideep.router.plugins.{fam}")
