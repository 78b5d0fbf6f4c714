"""hm3: hierarchical multi-objective model merging.

Level 1 searches merge coefficients in parameter space, level 2 recombines layers
in architecture space; both score candidates through one evaluation engine that
swaps weights in place instead of reloading models.
"""

import os

# Before anything imports torch: idle OpenMP workers must sleep, not spin. With libgomp's default
# (spin up to ~3 ms between parallel regions) the back-to-back tensor ops of the in-memory merge and
# of evaluation ran 10x slower whenever other processes held the cores (hm3/merge/inmemory.py has the
# measurements); PASSIVE costs nothing on an idle machine. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
