"""Host and model sides of the data: labelled structures and their validation, the batch field registry, neighbour lists, graphs and batches.

Internal layout; the public API is :mod:`atomforge` itself."""
