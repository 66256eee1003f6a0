"""``python -m atomforge`` (also what ``torchrun -m atomforge`` runs)."""

from .cli import main

raise SystemExit(main())
