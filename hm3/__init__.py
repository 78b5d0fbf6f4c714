"""hm3: hierarchical multi-objective model merging.

Level 1 searches merge coefficients in parameter space, level 2 recombines layers
in architecture space; both score candidates through one evaluation engine that
swaps weights in place instead of reloading models.
"""

__version__ = "0.1.0"
