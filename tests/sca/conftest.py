"""Shared, session-scoped fixtures for the sandbox, taint, verify and generate tests.

Booting a sandbox costs tens of milliseconds and many live unicorn engines slow down the creation
of new ones, so every sandbox, detector and verifier here is built once per test session and
reused: a sandbox run always starts from its flash-clone snapshot, so sharing is safe.

The sample services are deliberately vulnerable and only ever run inside ``sca.emu``; so do the
test-only services in ``tests/sca/data`` (see ``build.sh`` there).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from sca.alert import Message
from sca.emu.image import ServiceImage, load_image
from sca.emu.sandbox import Sandbox
from sca.generate import Detector, Generated
from sca.services import SAMPLES, manifest_path, traffic
from sca.services._traffic import ExploitCase
from sca.verify import Verifier

DATA = Path(__file__).resolve().parent / "data"
# Fixed seeds: every run of the suite sees the same variants and benign sessions.
VARIANT_SEEDS = tuple(range(1000, 1020))
BENIGN_SEEDS = tuple(range(30))


def exploit_cases(name: str) -> list[ExploitCase]:
    """The canonical exploit of sample ``name`` and its 20 fixed-seed variants."""
    t = traffic(name)
    return [t.exploit_case(None)] + [t.exploit_case(random.Random(s)) for s in VARIANT_SEEDS]


def benign_sessions(name: str) -> list[list[Message]]:
    t = traffic(name)
    return [t.benign(random.Random(s)) for s in BENIGN_SEEDS]


@pytest.fixture(scope="session")
def cases() -> dict[str, list[ExploitCase]]:
    """Per sample: the canonical exploit (index 0) and its 20 variants (1..20)."""
    return {name: exploit_cases(name) for name in SAMPLES}


@pytest.fixture(scope="session")
def benign() -> dict[str, list[list[Message]]]:
    """Per sample: 30 benign sessions from fixed seeds."""
    return {name: benign_sessions(name) for name in SAMPLES}


@pytest.fixture(scope="session")
def images() -> dict[str, ServiceImage]:
    return {name: load_image(manifest_path(name)) for name in SAMPLES}


@pytest.fixture(scope="session")
def sandboxes(images: dict[str, ServiceImage]) -> dict[str, Sandbox]:
    """One plain sandbox per sample, default budgets."""
    return {name: Sandbox(img) for name, img in images.items()}


@pytest.fixture(scope="session")
def detectors(images: dict[str, ServiceImage]) -> dict[str, Detector]:
    return {name: Detector(img) for name, img in images.items()}


@pytest.fixture(scope="session")
def verifier(images: dict[str, ServiceImage]) -> Verifier:
    return Verifier(list(images.values()))


@pytest.fixture(scope="session")
def generated(
    detectors: dict[str, Detector], verifier: Verifier, cases: dict[str, list[ExploitCase]]
) -> Callable[[str, int], Generated]:
    """``generated(name, i)``: the alert generated for exploit case ``i`` of ``name`` (0 is the
    canonical exploit, 1..20 the variants), computed once."""
    cache: dict[tuple[str, int], Generated] = {}

    def get(name: str, i: int) -> Generated:
        key = (name, i)
        if key not in cache:
            case = cases[name][i]
            run = detectors[name].inspect(case.messages)
            assert run.detection is not None, f"{name} exploit {i} not detected"
            g = detectors[name].generate(case.messages, run.detection, verifier)
            assert g is not None, f"{name} exploit {i}: no alert verified"
            cache[key] = g
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hostile_image() -> ServiceImage:
    return load_image(DATA / "hostile.toml")


@pytest.fixture(scope="session")
def snippet_image() -> ServiceImage:
    return load_image(DATA / "snippet.toml")
