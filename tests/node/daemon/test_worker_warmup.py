"""A worker is ready for the first alert: a detect worker replays each service's benign
warm-up request when it starts, so the first exploit it meets does not pay for translating and
compiling the service's code, and every worker has the modules its jobs run."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from node.daemon import worker
from sca.services import manifest_path, traffic


def test_a_detect_worker_warms_up_on_the_benign_request() -> None:
    saved = worker._state
    try:
        worker.init([str(manifest_path("resolver"))], detectors=True)
        detector = worker._st().detector("resolver")
        assert detector is not None
        warmed = len(detector.tracker.cache)
        assert warmed > 0  # the warm-up's instructions are decoded and compiled
        # ... and an exploit then finds most of its path ready.
        out = worker.detect("resolver", tuple(traffic("resolver").exploit(random.Random(3))))
        assert out.detected and out.alert is not None
        assert len(detector.tracker.cache) < 4 * warmed
    finally:
        worker._state = saved


def test_a_worker_has_what_its_jobs_run_before_the_first_one() -> None:
    """The forkserver preloads ``node.daemon.worker``; whatever a verification or a detection
    runs must come with it. Imported on the first alert instead (filter generation, compiled
    from source where no bytecode cache is written), it took ~23 ms of that alert's 24 ms
    verification in every worker it reached."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, node.daemon.worker; "
         "print(sorted(m for m in ('filters.generate', 'filters.condition') if m not in "
         "sys.modules))"], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
