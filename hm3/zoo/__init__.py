"""The embedded model zoo: tiny Llama models trained locally, so every hm3 command runs on a laptop CPU.

``build_zoo(DIR)`` (``hm3 zoo build DIR``) trains a base on the mixture of the
three zoo tasks (:mod:`objectives.zoo`) and one expert per task, and reports
the quality bar the zoo is meant to meet. Imports are lazy: torch and
transformers load only when a zoo is built.
"""
