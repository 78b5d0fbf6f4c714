"""Level-1 parameter search: search space, Pareto/HV protocol, optimisers (model-agnostic)."""
