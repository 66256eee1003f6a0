"""``atomforge al run`` with a pause injected at a campaign phase, so that a test can SIGKILL the
driver while it is in exactly that phase (``test_campaign_faults.py``).

    AL_FAULT_PAUSE_AT=1:select AL_FAULT_MARK=/tmp/paused python al_fault_driver.py al run campaign.yaml

Without ``AL_FAULT_PAUSE_AT`` this is ``python -m atomforge`` (``atomforge.cli.main``). With it,
the driver writes ``AL_FAULT_MARK`` (its pid) when it enters that phase of that iteration —
after the state says it is in that phase, before the phase's work — and waits until the file
``AL_FAULT_RESUME`` exists (or ``AL_FAULT_PAUSE_S`` seconds, default 120, have passed) before it
carries on. Worker processes import this file as ``__mp_main__``: everything is under the
``__main__`` guard.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _inject_pause(spec: str, mark: Path) -> None:
    from atomforge.active_learning import _loop

    iteration, phase = spec.split(":")
    original = _loop.PHASES[phase]

    def paused(campaign, tracker):  # noqa: ANN001, ANN202
        if campaign.state["iteration"] == int(iteration):
            mark.write_text(str(os.getpid()))
            resume = Path(os.environ.get("AL_FAULT_RESUME", "/nonexistent/never"))
            deadline = time.monotonic() + float(os.environ.get("AL_FAULT_PAUSE_S", "120"))
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return original(campaign, tracker)

    _loop.PHASES[phase] = paused


if __name__ == "__main__":
    if os.environ.get("AL_FAULT_PAUSE_AT"):
        _inject_pause(os.environ["AL_FAULT_PAUSE_AT"], Path(os.environ["AL_FAULT_MARK"]))
    from atomforge.cli import main

    sys.exit(main(sys.argv[1:]))
