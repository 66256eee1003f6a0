"""Analysis: error and uncertainty metrics, evaluation, physics metrics, MD with a model, plots.

Internal layout; the public API is :mod:`atomforge` itself."""
