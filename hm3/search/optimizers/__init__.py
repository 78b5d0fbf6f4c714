"""Registry of level-1 optimisers: name -> class (all share :class:`Optimizer`'s contract).

The registry names each class by module and is resolved on lookup, so importing the search package
(as a preference request does, to read a finished run) does not import botorch, gpytorch and pymoo:
those cost a fresh ``hm3 request`` process about 1.5 s on a 2-core CPU and a budget-0 answer
uses none of them.
"""

from __future__ import annotations

from importlib import import_module

from hm3.errors import ConfigError
from hm3.search.optimizers.base import Optimizer, run

OPTIMIZERS: dict[str, str] = {
    "bo-mo": "hm3.search.optimizers.bo_mo:BoMo",
    "bo-tcheby": "hm3.search.optimizers.bo_tcheby:BoTcheby",
    "df-merge": "hm3.search.optimizers.df_merge:DfMerge",
    "nsga2": "hm3.search.optimizers.nsga2:Nsga2",
    "random": "hm3.search.optimizers.random:RandomSearch",
    "hm3-fixed": "hm3.search.optimizers.fixed:Fixed",
}


def get_optimizer(name: str) -> type[Optimizer]:
    """The optimiser class registered as ``name``; unknown names list the known ones."""
    try:
        module, cls = OPTIMIZERS[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}") from None
    return getattr(import_module(module), cls)


__all__ = ["OPTIMIZERS", "Optimizer", "get_optimizer", "run"]
