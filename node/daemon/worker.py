"""What runs in the sandbox process pools.

Each pool process keeps, for its whole life, one ``Detector`` per protected service and one
``Verifier`` for all of them: booting a flash clone costs about 50 ms, a verification after
that well under one. ``init`` (the pool's initializer) loads the images and boots them up front,
so the first alert after start is as fast as the hundredth.

The job functions take and return only plain picklable values (bytes, tuples of
``sca.alert.Message``, small dataclasses), never raise for bad input (the error comes back as a
string in the result), and never touch the store, the kernel or the network: they are the pure
CPU part of the pipeline.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filters import generate as filter_generation
from node.daemon import realtime
from sca.alert import Alert, Message
from sca.codec import FormatError, decode_alert, encode_alert, encoding_id_hex
from sca.emu.image import ServiceImage, load_image
from sca.generate import Detector
from sca.taint.engine import INTERRUPTED
from sca.verify import Verifier


@dataclass(frozen=True)
class DetectOutcome:
    service: str
    detected: bool
    elapsed_ms: float
    instructions: int = 0
    tainted: int = 0
    outcome: str = ""
    alert: bytes | None = None  # canonical encoding of a locally verified alert
    alert_type: str = ""
    detail: str = ""
    verify_detail: str = ""
    verify_ms: float = 0.0
    tried: int = 0
    specific: dict[str, Any] | None = None  # the specific filter's JSON
    error: str | None = None
    interrupted: bool = False  # stopped early: the daemon asked (a longer history came)


@dataclass(frozen=True)
class VerifyOutcome:
    alert_id: str
    verified: bool
    reason: str
    detail: str
    elapsed_ms: float
    specific: dict[str, Any] | None = None  # when verified: the specific filter's JSON
    error: str | None = None


@dataclass(frozen=True)
class FiltersOutcome:
    alert_id: str
    filters: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]
    elapsed_ms: float
    oracle_runs: int = 0
    error: str | None = None


class _State:
    def __init__(self, manifests: list[str]) -> None:
        self.images: dict[str, ServiceImage] = {}
        self.errors: dict[str, str] = {}
        for m in manifests:
            try:
                img = load_image(Path(m))
            except Exception as e:  # a bad manifest is reported by the node, not fatal here
                self.errors[m] = str(e)
                continue
            self.images[img.name] = img
        self.by_id = {img.service_id: img for img in self.images.values()}
        self.verifier = Verifier(list(self.images.values()))
        self.detectors: dict[str, Detector] = {}

    def detector(self, name: str) -> Detector | None:
        d = self.detectors.get(name)
        if d is None and name in self.images:
            d = self.detectors[name] = Detector(self.images[name])
        return d


_state: _State | None = None
_conn: Any = None  # this worker's pipe to the daemon, while serve() runs
STOP = "stop"  # the daemon's message: stop the job running now, if it can


def _stop_requested() -> bool:
    """Whether the daemon asked to stop the job running now (a long replay polls this)."""
    conn = _conn
    return conn is not None and conn.poll() and conn.recv() == STOP


def lower_priority(nice: int) -> None:
    """Make this process yield the CPU to the daemon's other work, on the whole host.

    ``nice`` alone only ranks a process against the others of its session: with the kernel's
    autogroups (the default for processes outside a cgroup of their own) each session shares
    the CPU equally, so a nice-10 filter generation still took a full share from another
    node's event loop (every node of a testbed, every login session of a host). In a session of
    its own with its autogroup niced too, the ranking holds across sessions."""
    with contextlib.suppress(OSError):
        os.setsid()
    os.nice(nice)
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
        f.write(str(nice))


def init(manifests: list[str], detectors: bool, nice: int = 0, priority: int = 0) -> None:
    """Pool initializer: lower the process's CPU priority by ``nice`` (or raise it to
    ``SCHED_FIFO`` at ``priority``, ``node.daemon.realtime``), load the images, boot the
    verifier's clones (and the detectors' in the detection pool)."""
    global _state
    if nice:
        lower_priority(nice)
    realtime.enter(priority)  # where refused, the daemon's own attempt has said so
    _state = _State(manifests)
    for img in _state.images.values():
        try:
            sandbox = _state.verifier.sandbox(img.service_id)
            detector = _state.detector(img.name) if detectors else None
            if img.warmup:
                # A first replay translates (and with taint, compiles) every instruction it
                # reaches: on the service's benign request now, not on the first alert, whose
                # detection then took 4-8x the later ones (~210 ms for httpd).
                warm = (Message(img.warmup, 0 if img.proto == "tcp" else None),)
                if sandbox is not None:
                    sandbox.run(warm)
                if detector is not None:
                    detector.inspect(warm, conditions=False)
        except Exception:
            pass  # the job that needs it reports the error


def serve(conn: Any, manifests: list[str], detectors: bool, nice: int, priority: int) -> None:
    """A pool worker's life (``node.daemon.pools``): boot, then answer jobs from the pipe,
    ``(fn, args)`` -> ``("ok", result)`` or ``("err", exception)``, until it closes."""
    global _conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the daemon: it stops us
    init(manifests, detectors, nice, priority)
    _conn = conn
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        if job == STOP:  # for a job that ended before it came
            continue
        fn, args = job
        try:
            answer: tuple[str, Any] = ("ok", fn(*args))
        except Exception as e:
            answer = ("err", e)
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send(("err", RuntimeError(f"{fn!r}: its answer cannot be sent back: {e!r}")))


def _st() -> _State:
    if _state is None:  # a pool made without the initializer (tests): no services
        init([], False)
    assert _state is not None
    return _state


def ping() -> int:
    """The worker's pid (the node checks the pool is alive with it)."""
    _st()
    return os.getpid()


def specific_filter(alert: Alert, image: ServiceImage) -> dict[str, Any] | None:
    """The specific filter (the exploit's bytes at the alert's offsets) without the oracle
    runs that the general one needs: cheap enough to install right after verification. None
    where it would match the service's benign request (the general one may still come)."""
    # The same function generate_filters uses: the same filter id for the same alert.
    try:
        return filter_generation.specific_filter(alert, image).to_json()
    except filter_generation.FilterGenerationError:
        return None


def detect(service: str, messages: tuple[Message, ...]) -> DetectOutcome:
    """Replay ``messages`` to ``service`` with taint; on an exploit, generate the smallest alert
    that verifies and its specific filter."""
    start = time.perf_counter()

    def ms() -> float:
        return (time.perf_counter() - start) * 1000

    st = _st()
    try:
        detector = st.detector(service)
        if detector is None:
            return DetectOutcome(service, False, ms(), error=f"no service {service!r} here")
        detector.tracker.interrupted = _stop_requested
        run = detector.inspect(messages, conditions=False)  # the filters lane records them
        if run.result.stop_reason == INTERRUPTED:
            return DetectOutcome(service, False, ms(), run.instructions, interrupted=True)
        base: dict[str, Any] = {"instructions": run.instructions,
                                "tainted": run.tainted_instructions,
                                "outcome": run.result.outcome.value}
        if run.detection is None:
            return DetectOutcome(service, False, ms(), **base)
        kind = run.detection.verification.type.value
        generated = detector.generate(messages, run.detection, st.verifier)
        if generated is None:
            return DetectOutcome(service, True, ms(), alert_type=kind,
                                 detail=run.detection.detail,
                                 error="no candidate alert verified", **base)
        return DetectOutcome(
            service, True, ms(), alert=encode_alert(generated.alert), alert_type=kind,
            detail=run.detection.detail, verify_detail=generated.verdict.detail,
            verify_ms=generated.verdict.elapsed_s * 1000, tried=generated.tried,
            specific=specific_filter(generated.alert, detector.image), **base)
    except Exception as e:
        return DetectOutcome(service, False, ms(), error=_describe(e))


def verify(alert_bytes: bytes) -> VerifyOutcome:
    """Verify an alert in this process's own sandbox; when it verifies, its specific filter."""
    start = time.perf_counter()
    try:
        alert = decode_alert(alert_bytes)
    except FormatError as e:
        return VerifyOutcome("", False, "malformed", str(e), 0.0)
    aid = encoding_id_hex(alert_bytes)  # decoded just now
    try:
        st = _st()
        verdict = st.verifier.verify(alert)
        specific = None
        if verdict.verified:
            specific = specific_filter(alert, st.by_id[alert.service_id])
        return VerifyOutcome(aid, verdict.verified, verdict.reason.value, verdict.detail,
                             verdict.elapsed_s * 1000, specific)
    except Exception as e:
        return VerifyOutcome(aid, False, "error", _describe(e),
                             (time.perf_counter() - start) * 1000, error=_describe(e))


def filters(alert_bytes: bytes) -> FiltersOutcome:
    """Both filters of a verified alert (the general one takes tens to hundreds of sandbox
    replays: this is the slow lane's job)."""
    start = time.perf_counter()
    aid = ""
    try:
        alert = decode_alert(alert_bytes)
        aid = encoding_id_hex(alert_bytes)
        st = _st()
        image = st.by_id.get(alert.service_id)
        if image is None:
            return FiltersOutcome(aid, (), (), 0.0, error="no such service here")
        gen = filter_generation.generate_filters(alert, image, detector=st.detector(image.name),
                               verifier=st.verifier)
        fs = tuple(f.to_json() for f in (gen.specific, gen.general) if f is not None)
        return FiltersOutcome(aid, fs, tuple(gen.notes), (time.perf_counter() - start) * 1000,
                              gen.oracle_runs)
    except Exception as e:
        return FiltersOutcome(aid, (), (), (time.perf_counter() - start) * 1000,
                              error=_describe(e))


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    loc = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
    return f"{type(e).__name__}: {e}{loc}"[:1000]
