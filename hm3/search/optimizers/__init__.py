"""Registry of level-1 optimisers: name -> class (all share :class:`Optimizer`'s contract)."""

from __future__ import annotations

from hm3.errors import ConfigError
from hm3.search.optimizers.base import Optimizer, run
from hm3.search.optimizers.bo_mo import BoMo
from hm3.search.optimizers.bo_tcheby import BoTcheby, tchebycheff
from hm3.search.optimizers.df_merge import DfMerge
from hm3.search.optimizers.fixed import Fixed
from hm3.search.optimizers.nsga2 import Nsga2
from hm3.search.optimizers.random import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (BoMo, BoTcheby, DfMerge, Nsga2, RandomSearch, Fixed)
}


def get_optimizer(name: str) -> type[Optimizer]:
    """The optimiser class registered as ``name``; unknown names list the known ones."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}") from None


__all__ = ["OPTIMIZERS", "Optimizer", "get_optimizer", "run", "tchebycheff"]
