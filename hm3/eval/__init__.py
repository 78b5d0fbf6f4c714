"""Evaluation: backends that score a candidate model on objectives, the evaluation session searches
score through (``session``: the interface; ``live``: one live model in this process; ``parallel``:
an executor's workers, ``executor`` their interface, ``ray_executor`` Ray's), and the sandbox for
generated code."""
