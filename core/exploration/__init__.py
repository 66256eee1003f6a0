"""Active learning building blocks in core: explorer/selector records and protocols, oracles and safe labelling, flagging uncertain configurations.

Internal layout; the public API is :mod:`atomforge` itself."""
