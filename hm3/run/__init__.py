"""Runs: what ``hm3 search param`` and ``hm3 run`` write, and how a finished one is read.

* :mod:`hm3.run.config` -- the two-level run config, and the format of configs stored in a run store;
* :mod:`hm3.run.directory` -- the run directory: its file names, format checks and reading;
* :mod:`hm3.run.front` -- the front, candidates, points and summary, written one way for both kinds;
* :mod:`hm3.run.two_level` -- the two-level run (level 1 -> level 2 -> final front);
* :mod:`hm3.run.export` -- a front point as a Hugging Face checkpoint.
"""
