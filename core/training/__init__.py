"""Training: the one loop (Trainer), the backends engines supply, optimisers and schedules, the loss interface.

Internal layout; the public API is :mod:`atomforge` itself."""
