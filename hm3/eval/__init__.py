"""Evaluation: backends that score a candidate model on objectives, and the sandbox for generated code."""
