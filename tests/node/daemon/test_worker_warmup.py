"""A detect worker replays each service's benign warm-up request when it starts, so the first
exploit it meets does not pay for translating and compiling the service's code."""

from __future__ import annotations

import random

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
