"""Merging checkpoints: the equations (ops), the method registry, the plan and the engines."""
