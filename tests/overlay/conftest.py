"""Fixtures for the overlay's network tests: real resolver alerts, the real verifier, and a
check that nothing went wrong quietly (no error logs, no unhandled task exceptions)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from sca.codec import encode_alert
from sca.emu.image import ServiceImage, load_image
from sca.generate import Detector
from sca.services import manifest_path, traffic
from sca.verify import Verifier

# Every test network gets its own 127.<n>.0.0/16, away from the benchmark's 127.40/41.
_prefixes = itertools.count(random.Random().randrange(60, 120))


@pytest.fixture
def prefix() -> int:
    return next(_prefixes) % 200 + 50


@pytest.fixture(scope="session")
def resolver_image() -> ServiceImage:
    return load_image(manifest_path("resolver"))


@pytest.fixture(scope="session")
def alerts(resolver_image: ServiceImage) -> list[bytes]:
    """Five distinct verified resolver alerts, made the real way."""
    detector = Detector(resolver_image)
    verifier = Verifier([resolver_image])
    rng = random.Random(11)
    out: list[bytes] = []
    while len(out) < 5:
        messages = tuple(traffic("resolver").exploit(rng))
        run = detector.inspect(messages)
        assert run.detection is not None
        generated = detector.generate(messages, run.detection, verifier)
        assert generated is not None
        encoded = encode_alert(generated.alert)
        if encoded not in out:
            out.append(encoded)
    return out


@pytest.fixture(scope="session")
def verifier(resolver_image: ServiceImage) -> Verifier:
    v = Verifier([resolver_image])
    v.sandbox(resolver_image.service_id)
    return v


class Trouble(logging.Handler):
    """Collects WARNING and worse from everywhere, plus whatever the loop's exception handler
    sees (that is where 'Task exception was never retrieved' goes)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.loop_errors: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        bad = [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]
        bad += [r.getMessage() for r in self.records
                if "never retrieved" in r.getMessage() or "Exception in" in r.getMessage()
                or "failed" in r.getMessage()]
        bad += [str(c.get("message")) + " " + repr(c.get("exception")) for c in self.loop_errors]
        return bad


@pytest.fixture
def trouble() -> Iterator[Trouble]:
    handler = Trouble()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


@pytest.fixture
def run(trouble: Trouble) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine on a fresh loop whose exception handler reports to ``trouble``;
    collects garbage at the end so a never-retrieved task exception gets logged in time."""
    def go(coro: Coroutine[Any, Any, Any]) -> Any:
        async def main() -> Any:
            asyncio.get_running_loop().set_exception_handler(
                lambda loop, ctx: trouble.loop_errors.append(ctx))
            return await coro
        try:
            return asyncio.run(main())
        finally:
            import gc
            gc.collect()
    return go
