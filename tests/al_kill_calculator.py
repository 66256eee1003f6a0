"""A test-only ASE calculator for the kill-and-resume test (``tests/test_al_kill.py``).

``CountingEMT`` is ASE's EMT that, before each calculation, appends the structure's campaign key
(``structure_hash``) to the file named by ``$AL_KILL_ORACLE_LOG`` and then sleeps
``$AL_KILL_ORACLE_SLEEP`` seconds, so a test can count oracle calls per structure and has time
to kill a campaign in the middle of labelling. Used through the ``ase_calculator`` oracle:
``oracle: {name: ase_calculator, calculator: "al_kill_calculator:CountingEMT"}``.
"""

from __future__ import annotations

import os
import time

from ase.calculators.emt import EMT

from atomforge.active_learning import structure_hash


class CountingEMT(EMT):
    """EMT that logs one line (the structure key) per calculation and then waits a little."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):  # noqa: ANN001
        if atoms is not None:
            with open(os.environ["AL_KILL_ORACLE_LOG"], "a") as handle:
                handle.write(structure_hash(atoms) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            time.sleep(float(os.environ.get("AL_KILL_ORACLE_SLEEP", "0")))
        super().calculate(atoms, properties, system_changes)
