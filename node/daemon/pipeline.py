"""The node's alert logic: detecting exploits in its own traffic, and receiving alerts.

Detection (a detector node)::

    submit_messages(service, messages, raw_packets)        # from the stack, on the loop
      -> Sampler (bounded, fair, sampled under load)       # node.daemon.sampler
      -> detect lane: worker.detect (taint, generate, verify locally, specific filter)
      -> sign with the node key -> broadcast(envelope); once the nodes it went to have
         fetched it (``handoff``, at most serve_first_s): install the specific filter, then
         store (verified, with the raw packets), then the forward's state (forwarded)
      -> after filters.general_delay_ms, filters lane (low CPU priority): worker.filters
         (general filter) -> install

Receiving (every node)::

    on_overlay_alert(envelope_bytes, from_peer) -> Decision
      -> decode the envelope, check the signature, decode the alert   (on the loop: cheap)
      -> known? the standing verdict (in memory: all of the store's when it holds at most
         MAX_VERDICTS, else read from the store while the sandbox already runs) stands: no
         second forward
      -> fast lane: worker.verify (own sandbox) -> the verdict
      -> verified: Decision(forward=True); from the overlay, once the nodes it went to have
         fetched it (``handoff``, at most serve_first_s): install the specific filter, then
         store the verdict; general filter later
      -> refuted or forged: stored as refuted, never forwarded

For ``overlay.Overlay``, which verifies and forwards by itself, the same path is split in two:
``overlay_verify_body(envelope_bytes)`` (its ``verify_body=``: sandbox, signature and the
alert's parse) and ``overlay_on_alert(envelope, alert)`` (its ``on_alert=``: marked forwarded).

Everything a decision depends on is in the store or in the verdict of our own sandbox: the
signature only says who sent an alert. A bad signature is never held against the alert itself
(anyone can attach a bad signature to a true alert), and a refutation for lack of budget is
not remembered (it may pass when the node is less busy).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from overlay.broadcast import Outcome
from sca.alert import Alert, Message
from sca.codec import FormatError, decode_alert, encoding_id_hex
from sca.emu.image import ServiceImage
from sca.envelope import MAX_ENVELOPE_BYTES, Envelope, SignatureError, decode_envelope, seal
from sca.keys import NodeKey

from . import worker
from .events import EventBus
from .filters import FilterManager
from .pools import JobFailed, Pools
from .sampler import DUPLICATE, QUEUED, SAMPLED_OUT, SUPERSEDED, Job, Sampler
from .store import StoreRunner
from .worker import DetectOutcome, VerifyOutcome

Broadcast = Callable[[bytes], Awaitable[Any] | Any]
# ``Overlay.handed_over``: (alert id, timeout s) -> once the contacts it went to have it.
Handoff = Callable[[bytes, float], Awaitable[bool]]

# Refutation reasons that depend on the moment, not on the alert: not remembered.
TRANSIENT = frozenset({"budget-exhausted", "error", "timeout"})
MAX_SUBMIT_MESSAGES = 64
MAX_VERDICTS = 20_000  # standing verdicts kept in memory (ids and states: ~5 MB at most)
MAX_SUBMIT_BYTES = 256 * 1024


@dataclass(frozen=True)
class Decision:
    """What became of a received alert. ``forward`` is True exactly once per alert: the first
    time it verifies here (the caller then forwards it)."""

    alert_id: str
    state: str  # verified, refuted, received (cannot tell here), malformed
    forward: bool
    reason: str
    duplicate: bool = False


@dataclass
class DetectorStats:
    analysed: int = 0
    stops: int = 0  # replays asked to stop (a longer history of their connection came)
    interrupted: int = 0  # replays that did stop early
    detections: int = 0
    alerts: int = 0
    errors: int = 0
    last_ms: float = 0.0
    total_ms: float = 0.0
    last_service: str = ""
    last_at: float = 0.0


@dataclass
class VerifierStats:
    runs: int = 0
    verified: int = 0
    refuted: int = 0
    cached: int = 0
    last_ms: float = 0.0
    total_ms: float = 0.0


def _peer_text(from_peer: object) -> str | None:
    if from_peer is None:
        return None
    if isinstance(from_peer, tuple) and len(from_peer) == 2:
        return f"{from_peer[0]}:{from_peer[1]}"
    if isinstance(from_peer, bytes):
        return from_peer.hex()
    return str(from_peer)[:200]


class Pipeline:
    def __init__(self, *, key: NodeKey, images: Sequence[ServiceImage], pools: Pools,
                 db: StoreRunner, bus: EventBus, filters: FilterManager,
                 broadcast: Broadcast | None = None, detector: bool = False,
                 queue_size: int = 256, job_timeout_s: float = 10.0,
                 verify_timeout_s: float = 5.0, general_filters: bool = True,
                 detect_concurrency: int = 1, general_delay_s: float = 0.0,
                 serve_first_s: float = 0.0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.key = key
        self.node_id = key.node_id.hex()
        self.images = {img.name: img for img in images}
        self.by_port = {(img.proto, img.port): img.name for img in images}
        self.by_id = {img.service_id: img for img in images}
        self.pools = pools
        self.db = db
        self.bus = bus
        self.filters = filters
        self.broadcast = broadcast
        self.detector_enabled = detector
        self.job_timeout_s = job_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self.general_filters = general_filters
        self.general_delay_s = general_delay_s
        self.serve_first_s = serve_first_s
        self.handoff: Handoff | None = None
        self.detect_concurrency = max(1, detect_concurrency)
        self.clock = clock
        self.sampler = Sampler(queue_size, rng=rng)
        self.dstats = DetectorStats()
        self.vstats = VerifierStats()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._detecting: set[asyncio.Task[Any]] = set()  # detection jobs out, and their ends
        self._inflight: dict[str, list[asyncio.Future[VerifyOutcome]]] = {}  # by alert id
        self._queued: dict[str, asyncio.Future[None]] = {}  # the verdict's row is queued
        self._sealed: dict[bytes, str] = {}  # envelopes we signed -> alert id
        self._held: set[asyncio.Task[Any]] = set()  # own work waiting for its hand-off
        self._replaying: dict[tuple[str, object], Job] = {}  # (service, flow) -> its job
        self._verdicts: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._complete = False  # True: every standing verdict of the store is in _verdicts
        self._active = 0  # detection jobs taken and not finished
        self._started = False
        self._closing = False

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # Every standing verdict in memory while the store holds few enough: a relay then
        # never waits for the store on the path of an alert (a read there took 1-7 ms).
        rows = await self.db(self.db.store.verdicts, MAX_VERDICTS + 1)
        for aid, state, reason in reversed(rows[:MAX_VERDICTS]):
            self._remember(aid, state, reason)
        self._complete = len(rows) <= MAX_VERDICTS
        if self.detector_enabled and self.pools.detect is None:
            raise RuntimeError("detection needs a pool with a detect lane")
        self._started = True
        self._pump()  # what was submitted before

    async def stop(self) -> None:
        """Stop taking work; wait briefly for what is in flight (stores are committed)."""
        self._closing = True
        detecting = list(self._detecting)
        for t in detecting:
            t.cancel()
        await asyncio.gather(*detecting, return_exceptions=True)
        # Held work stops waiting for its hand-off now (its row is queued as it ends).
        held = list(self._held)
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until the queue is empty and no job or background task runs (tests, tools)."""
        deadline = time.monotonic() + timeout
        while (len(self.sampler) or self._active or self.pools.busy or self._tasks
               or self._inflight):
            if time.monotonic() > deadline:
                raise TimeoutError("pipeline still busy")
            await asyncio.sleep(0.01)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.bus.emit("pipeline.error", task=name, error=repr(t.exception()))
        task.add_done_callback(done)

    # --- detection --------------------------------------------------------------------------

    def service_for(self, proto: str | int, port: int) -> str | None:
        """The protected service on (proto, port): "udp"/"tcp" or IPPROTO numbers 17/6."""
        p = {6: "tcp", 17: "udp"}.get(proto, proto) if isinstance(proto, int) else proto
        return self.by_port.get((str(p), port))

    def submit_messages(self, service: str, messages: Sequence[Message],
                        raw_packets: Sequence[Sequence[bytes]] = (),
                        flow: object = None) -> str:
        """Offer what ``service`` received for taint replay. ``messages`` is the history the
        replay needs (the flow's chunks for TCP, the datagram(s) for UDP), at most 64 messages
        and 256 KiB (older ones are cut); ``raw_packets[i]`` are the IP packets that carried
        ``messages[i]``, kept with an alert for traceback; ``flow`` names the connection whose
        history ``messages`` is (a longer one then takes a waiting one's place). Never blocks,
        never raises for bad input: returns ``"queued"``, ``"replaced"``, ``"superseded"``,
        ``"sampled-out"``, ``"duplicate"``, ``"off"`` (not a detector) or ``"refused: ..."``."""
        if not self.detector_enabled or self._closing:
            return "off"
        if service not in self.images:
            return f"refused: no protected service {service!r}"
        msgs = tuple(messages)[-MAX_SUBMIT_MESSAGES:]
        if not msgs or not all(isinstance(m, Message) for m in msgs):
            return "refused: messages must be sca.alert.Message"
        total = 0
        for i in range(len(msgs) - 1, -1, -1):
            total += len(msgs[i].data)
            if total > MAX_SUBMIT_BYTES:
                msgs = msgs[i + 1:]
                break
        if not msgs:
            return "refused: a single message over 256 KiB"
        pk = tuple(tuple(bytes(p) for p in per) for per in raw_packets)[-len(msgs):] \
            if raw_packets else ()
        job = Job(service, msgs, pk, self.clock(), flow)
        outcome = self.sampler.offer(job)
        self.bus.count("detector.offered")
        if outcome == SAMPLED_OUT:
            self.bus.count("detector.sampled_out")
        elif outcome == DUPLICATE:
            self.bus.count("detector.duplicate")
        elif outcome == SUPERSEDED:
            self.bus.count("detector.superseded")
        running = self._replaying.get((service, flow)) if flow is not None else None
        # The replay running for this connection's shorter history is wasted: the longer one
        # replays all of it. Stopped, it frees the lane for the longer one now (the two chunks
        # of one request came 1-2 ms apart; a replay of the first took 10-30).
        if (running is not None and outcome in (QUEUED, SUPERSEDED) and job.extends(running)
                and self.pools.detect is not None
                and self.pools.detect.interrupt((service, flow))):
            self.dstats.stops += 1
        self._pump()  # after the stop: this job must not be taken for the one it replaces
        return outcome

    def _pump(self) -> None:
        """Take jobs while fewer than ``detect_concurrency`` run. A job's replay goes out to
        the worker from here, the caller's own callback (the stack's, for a packet), not a
        round of the loop later."""
        lane = self.pools.detect
        while (self._started and not self._closing and lane is not None
               and self._active < self.detect_concurrency):
            job = self.sampler.take()
            if job is None:
                return
            self._active += 1  # taken but not finished: idle() must wait for it
            key = (job.service, job.flow) if job.flow is not None else None
            if key is not None:
                self._replaying[key] = job
            replay = lane.submit(worker.detect, job.service, job.messages,
                                 timeout=self.job_timeout_s, key=key)
            task = asyncio.ensure_future(self._detect_done(job, key, replay))
            self._detecting.add(task)
            # Also for a task cancelled before it ran (a stop): its count, its replay.
            task.add_done_callback(functools.partial(self._detection_ended, job, key, replay))

    def _detection_ended(self, job: Job, key: tuple[str, object] | None,
                         replay: asyncio.Future[DetectOutcome], task: asyncio.Task[Any]) -> None:
        self._detecting.discard(task)
        replay.cancel()  # given up if it still runs
        if key is not None and self._replaying.get(key) is job:
            del self._replaying[key]
        self._active -= 1
        self._pump()

    async def _detect_done(self, job: Job, key: tuple[str, object] | None,
                           replay: asyncio.Future[DetectOutcome]) -> None:
        try:
            await self._finish_detection(job, key, replay)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.dstats.errors += 1
            self.bus.emit("detector.error", service=job.service, error=repr(e))

    async def _finish_detection(self, job: Job, key: tuple[str, object] | None,
                                replay: asyncio.Future[DetectOutcome]) -> DetectOutcome | None:
        """The end of a detection job (``replay``: its run in the detect lane)."""
        try:
            out = await replay
        except JobFailed as e:
            self.dstats.errors += 1
            self.sampler.forget([job.digest])
            self.bus.emit("detector.error", service=job.service, error=str(e))
            return None
        finally:
            if key is not None and self._replaying.get(key) is job:
                del self._replaying[key]
        s = self.dstats
        if out.interrupted:
            s.interrupted += 1
            self.bus.count("detector.interrupted")
            return out
        s.analysed += 1
        s.last_ms, s.total_ms = out.elapsed_ms, s.total_ms + out.elapsed_ms
        s.last_service, s.last_at = job.service, self.clock()
        self.bus.count("detector.analysed")
        if out.error and not out.detected:
            s.errors += 1
            self.bus.emit("detector.error", service=job.service, error=out.error)
            return out
        if not out.detected:
            return out
        s.detections += 1
        if out.alert is None:
            self.bus.emit("detector.unconfirmed", service=job.service, type=out.alert_type,
                          detail=out.detail, error=out.error)
            return out
        await self._detected(job, out)
        return out

    async def _detected(self, job: Job, out: DetectOutcome) -> None:
        assert out.alert is not None
        # Decoded below before it is signed; an id we know names bytes that decoded before.
        aid = encoding_id_hex(out.alert)
        known = await self._known(aid)  # from memory unless the store holds more than it
        if known is not None:
            await self._after_row(aid)  # a relay's row may be held back: read it once queued
        existing = (await self.db(self.db.store.alert, aid)
                    if known is not None and known[0] in ("verified", "forwarded") else None)
        if existing is not None and existing.state in ("verified", "forwarded"):
            await self.db(self.db.store.record_alert, alert_id=aid,
                          service_id=existing.service_id, service=existing.service,
                          type=existing.type, alert=out.alert, origin=existing.origin,
                          state=existing.state, reason=existing.reason)
            self.bus.emit("alert.detected_again", alert_id=aid, service=job.service)
            return
        alert = decode_alert(out.alert)
        signed_at = self.clock()
        envelope = seal(out.alert, self.key, signed_at).encode()
        self._sealed[envelope] = aid
        while len(self._sealed) > 16:  # only its publication needs it
            del self._sealed[next(iter(self._sealed))]
        self.dstats.alerts += 1
        self._remember(aid, "verified", out.verify_detail)
        packets = functools.cache(lambda: _packets_for(alert, job))

        def write() -> Any:  # in the store's thread: the packets are picked there, off the path
            return self.db.store.record_alert(
                alert_id=aid, service_id=alert.service_id.hex(), service=alert.service_name,
                type=alert.type.value, alert=out.alert, origin="detected", state="verified",
                reason=out.verify_detail, envelope=envelope, signer=self.node_id,
                signed_at=signed_at, packets=packets(),
                verification=(True, "verified", out.verify_detail, out.verify_ms))

        own = self._own_work(aid, write, out.specific, held=self.broadcast is not None)
        detected_at = self.clock()  # the event may wait for the hand-off: it says when

        async def settled() -> None:
            await own
            self.bus.emit("alert.detected", alert_id=aid, service=alert.service_name,
                          type=alert.type.value, detail=out.detail,
                          detect_ms=round(out.elapsed_ms, 3), candidates=out.tried,
                          packets=len(packets()), messages=len(alert.messages),
                          detected_at_s=round(detected_at, 6))

        # Published here and now, not from a task (that would start on the loop's next round).
        if await self._publish(aid, envelope):
            await asyncio.gather(self._forwarded(aid, origin="detected"), settled())
        else:
            await settled()
        if self.general_filters:
            self._spawn(self._general(aid, out.alert), f"filters-{aid[:8]}")

    async def _broadcast(self, aid: str, envelope: bytes) -> None:
        if await self._publish(aid, envelope):
            await self._forwarded(aid, origin="detected")

    async def _publish(self, aid: str, envelope: bytes) -> bool:
        """Our own alert out to the overlay; False if it is not (an event says why)."""
        if self.broadcast is None:
            self.bus.emit("alert.not_broadcast", alert_id=aid, reason="no overlay wired")
            return False
        try:
            r = self.broadcast(envelope)
            if inspect.isawaitable(r):
                await r
        except Exception as e:
            self.bus.emit("alert.broadcast_error", alert_id=aid, error=repr(e))
            return False
        return True

    async def _general(self, aid: str, alert_bytes: bytes) -> None:
        # Hundreds of milliseconds of sandbox runs: started once the alert's burst here is
        # over (its fetches by our neighbours, our forward), not in the middle of it. Even at
        # the lowest priority the job held a CPU for milliseconds at a time while that work
        # waited on the other one (the scheduler moves waiting work over only now and then).
        if self.general_delay_s > 0:
            await asyncio.sleep(self.general_delay_s)
            if self._closing:
                return  # stopping: not a sandbox job of hundreds of ms now
        try:
            out = await self.pools.filters.run(worker.filters, alert_bytes,
                                            timeout=max(60.0, self.job_timeout_s))
        except JobFailed as e:
            self.bus.emit("filter.error", action="generate", alert_id=aid, error=str(e))
            return
        if out.error:
            self.bus.emit("filter.error", action="generate", alert_id=aid, error=out.error)
        for note in out.notes:
            self.bus.emit("filter.note", alert_id=aid, note=note)
        if out.filters:
            await self.filters.install(out.filters, alert_id=aid)

    # --- receiving --------------------------------------------------------------------------

    def _verify(self, alert_bytes: bytes, aid: str) -> asyncio.Future[VerifyOutcome]:
        """Our own sandbox's verdict, once per alert even when copies arrive together: each
        caller gets a future of its own (one that gives up leaves the others theirs), resolved
        as the job answers. The job goes out now, before the caller does anything else
        (``Lane.submit``)."""
        mine: asyncio.Future[VerifyOutcome] = asyncio.get_running_loop().create_future()
        waiters = self._inflight.get(aid)
        if waiters is not None:
            self.vstats.cached += 1
            waiters.append(mine)
            return mine
        self._inflight[aid] = [mine]
        job = self.pools.fast.submit(worker.verify, alert_bytes, timeout=self.verify_timeout_s)
        job.add_done_callback(functools.partial(self._verified, aid))
        return mine

    def _verified(self, aid: str, job: asyncio.Future[Any]) -> None:
        waiters = self._inflight.pop(aid, [])
        if job.cancelled():
            out = VerifyOutcome(aid, False, "error", "verification cancelled", 0.0,
                                error="cancelled")
        else:
            e, out = job.exception(), None
            if e is None:
                out = job.result()
            if not isinstance(out, VerifyOutcome):  # a failed job, or a worker gone wrong
                why = str(e) if e is not None else f"not a verdict: {type(out).__name__}"
                out = VerifyOutcome(aid, False, "timeout" if isinstance(e, JobFailed)
                                    else "error", why, 0.0, error=why)
        if out.reason not in ("malformed", "unknown-service"):  # no verdict on an alert here
            self.vstats.runs += 1
            self.vstats.last_ms = out.elapsed_ms
            self.vstats.total_ms += out.elapsed_ms
            if out.verified:
                self.vstats.verified += 1
            else:
                self.vstats.refuted += 1
            self.bus.count("verifier.runs")
        for fut in waiters:
            if not fut.done():
                fut.set_result(out)

    async def _known(self, aid: str) -> tuple[str, str] | None:
        """A verdict that stands for this alert: (state, reason), or None to verify it."""
        hit = self._verdicts.get(aid)
        if hit is not None or self._complete:
            return hit
        row = await self.db(self.db.store.alert, aid)
        if row is None:
            return None
        self._remember(aid, row.state, row.reason)
        return self._verdicts.get(aid)

    def _remember(self, aid: str, state: str, reason: str | None = None) -> None:
        """Keep a verdict that stands (a refutation for lack of budget or for a bad signature
        does not: it may pass later), the most recent ``MAX_VERDICTS``. ``reason`` None: the
        one already kept (a state change such as verified -> forwarded)."""
        if reason is None:
            reason = self._verdicts.get(aid, ("", "verified"))[1]
        if state in ("verified", "forwarded") or (
                state == "refuted" and reason not in TRANSIENT | {"bad-signature"}):
            self._verdicts[aid] = (state, reason)
            self._verdicts.move_to_end(aid)
            while len(self._verdicts) > MAX_VERDICTS:
                self._verdicts.popitem(last=False)
                self._complete = False  # the store holds verdicts that memory does not

    async def on_overlay_alert(self, envelope_bytes: bytes, from_peer: object = None, *,
                               origin: str = "overlay") -> Decision:
        """An envelope from another node (``origin="import"``: given by an operator). Never
        raises for what the peer sent."""
        peer = _peer_text(from_peer)
        self.bus.count("alerts.received")
        if not isinstance(envelope_bytes, bytes | bytearray | memoryview) \
                or len(envelope_bytes) > MAX_ENVELOPE_BYTES:
            self.bus.emit("alert.malformed", from_peer=peer, error="not bytes or too large")
            return Decision("", "malformed", False, "too large or not bytes")
        data = bytes(envelope_bytes)
        try:
            envelope = decode_envelope(data)
        except FormatError as e:
            self.bus.emit("alert.malformed", from_peer=peer, error=str(e))
            return Decision("", "malformed", False, str(e))
        try:
            alert = decode_alert(envelope.alert_bytes)
        except FormatError as e:
            self.bus.emit("alert.malformed", from_peer=peer, signer=envelope.node_id.hex(),
                          error=str(e))
            return Decision("", "malformed", False, str(e))
        aid = encoding_id_hex(envelope.alert_bytes)  # decoded just now
        try:
            envelope.check()
        except SignatureError as e:
            return await self._bad_signature(aid, alert, envelope, peer, str(e), origin)
        return await self._receive(aid, alert, envelope, peer, origin, data)

    async def _bad_signature(self, aid: str, alert: Alert, envelope: Envelope,
                             peer: str | None, error: str, origin: str) -> Decision:
        row = await self.db(self.db.store.alert, aid)
        if row is None or row.state in ("received", "refuted"):
            await self.db(self.db.store.record_alert, alert_id=aid,
                          service_id=alert.service_id.hex(), service=alert.service_name,
                          type=alert.type.value, alert=envelope.alert_bytes, origin=origin,
                          state="refuted", reason="bad-signature", from_peer=peer)
        self.bus.emit("alert.refuted", alert_id=aid, service=alert.service_name,
                      reason="bad-signature", detail=error, from_peer=peer,
                      claimed_signer=envelope.node_id.hex())
        return Decision(aid, "refuted", False, "bad-signature")

    async def _receive(self, aid: str, alert: Alert | None, envelope: Envelope,
                       peer: str | None, origin: str = "overlay",
                       envelope_bytes: bytes | None = None,
                       verifying: asyncio.Future[VerifyOutcome] | None = None) -> Decision:
        """``verifying``: our sandbox's run on it, already started. ``alert`` None: not parsed
        here yet (the worker parses it for its run): parsed for the row and the events, once
        the verdict is out."""
        alert_bytes = envelope.alert_bytes
        # The sandbox starts while the store looks for a standing verdict: both are on the path
        # of every hop, and an alert met before is rare here (the overlay drops repeats), so a
        # wasted run costs less than waiting for the store first.
        known = self._verdicts.get(aid)  # reached or read by this process: no wait
        if known is None:
            if verifying is None and alert is not None and alert.service_id in self.by_id:
                verifying = self._verify(alert_bytes, aid)
            try:
                known = await self._known(aid)
            except BaseException:
                _abandon(verifying)
                raise
        # decode_envelope accepted only the canonical encoding: the bytes as received are the
        # envelope's encoding, no need to make it again.
        env_fields = {"envelope": envelope_bytes or envelope.encode(),
                      "signer": envelope.node_id.hex(), "signed_at": envelope.signed_at_s}
        fields = functools.cache(lambda: _row_fields(aid, alert_bytes, alert, origin, peer))
        if known is not None:
            _abandon(verifying)
            state, reason = known
            self.vstats.cached += 1
            await self._after_row(aid)  # a copy's row after the first one's
            state, reason = self._verdicts.get(aid, known)  # it may be forwarded by now
            await self.db(self.db.store.record_alert, state=state, reason=reason, **fields(),
                          **env_fields)
            self.bus.emit("alert.duplicate", alert_id=aid, state=state, from_peer=peer)
            return Decision(aid, "verified" if state == "forwarded" else state, False, reason,
                            duplicate=True)
        if verifying is not None:
            out = await verifying
        else:  # not a service of ours: no sandbox can tell, no need to ask the pool
            out = VerifyOutcome(aid, False, "unknown-service", "not protected here", 0.0)
        if alert is None and not out.verified:
            # Not forwarded, so parsed here now (a verified alert the worker parsed: its row's
            # columns are parsed off the path).
            try:
                alert = decode_alert(alert_bytes)
            except FormatError as e:
                out = VerifyOutcome(aid, False, "malformed", str(e), 0.0)
        if out.reason == "malformed":  # signed, and no alert: nothing worth a row
            self.bus.emit("alert.malformed", signer=envelope.node_id.hex(), error=out.detail)
            return Decision(aid, "refuted", False, out.reason)
        if out.reason == "unknown-service":
            await self.db(self.db.store.record_alert, state="received", reason=out.reason,
                          **fields(), **env_fields)
            self.bus.emit("alert.received", alert_id=aid, service=fields()["service"],
                          from_peer=peer, reason="no such service here: cannot verify")
            return Decision(aid, "received", False, out.reason)
        state = "verified" if out.verified else "refuted"
        self._remember(aid, state, out.reason)
        verdict_at = self.clock()  # the event may wait for the hand-off: it says when

        def write() -> Any:  # in the store's thread: the alert is parsed there, off the path
            return self.db.store.record_alert(
                state=state, reason=out.reason, **fields(), **env_fields,
                verification=(out.verified, out.reason, out.detail, out.elapsed_ms))

        # Verified from the overlay: after the hand-off (the store's one thread took 1 ms p50
        # of every hop when it wrote the row on the path). Anything else: queued now.
        own = (self._own_work(aid, write, out.specific, held=origin == "overlay")
               if out.verified else self.db.submit(write))

        async def store() -> None:
            await own
            self.bus.emit(f"alert.{state}", alert_id=aid, service=fields()["service"],
                          type=fields()["type"], reason=out.reason, detail=out.detail,
                          verify_ms=round(out.elapsed_ms, 3), from_peer=peer,
                          signer=env_fields["signer"], verdict_at_s=round(verdict_at, 6))

        self._spawn(store(), f"verdict-{aid[:8]}")
        if not out.verified:
            return Decision(aid, "refuted", False, out.reason)
        if self.general_filters:
            self._spawn(self._general(aid, alert_bytes), f"filters-{aid[:8]}")
        return Decision(aid, "verified", True, out.reason)

    async def mark_forwarded(self, alert_id: str, **fields: Any) -> None:
        await self._forwarded(alert_id, origin="overlay", **fields)

    async def _forwarded(self, aid: str, **fields: Any) -> None:
        await self._after_row(aid)  # the state goes onto the verdict's row
        self._remember(aid, "forwarded")  # now: a copy's row queued next reads it
        await self.db(self.db.store.set_alert_state, aid, "forwarded")
        self.bus.emit("alert.forwarded", alert_id=aid, **fields)

    def _own_work(self, aid: str, write: Callable[[], Any], specific: dict[str, Any] | None,
                  *, held: bool) -> Awaitable[Any]:
        """A verified alert's work here: its row (``write``) and its specific filter.

        ``held`` (our detection, or an alert the overlay forwards): propagation first. Both
        wait until the nodes the alert was announced to have fetched it (``handoff``, at most
        ``serve_first_s``; no wait when it went to nobody), so their fetches are served by a
        free loop instead of after this work (a kernel batch and store writes: 2-3 ms of
        every hop, traced). Then the filter, then the row (queued even if the wait is
        cancelled); a copy's row and the forward's state wait for it (``_after_row``).
        Otherwise the row is queued now (the store runs its calls in order) and the filter
        goes in alongside."""
        if not held or self.handoff is None or self.serve_first_s <= 0:
            written = self.db.submit(write)
            if specific is None:
                return written
            return asyncio.gather(written, self._install_specific(aid, specific))
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued[aid] = queued
        handoff = self.handoff

        async def later() -> None:
            try:
                try:
                    await handoff(bytes.fromhex(aid), self.serve_first_s)
                except Exception as e:  # the overlay stopped, say: nothing to wait for
                    self.bus.emit("alert.handoff_error", alert_id=aid, error=repr(e))
                if specific is not None:
                    await self._install_specific(aid, specific)
            finally:
                try:
                    written = self.db.submit(write)
                finally:
                    queued.set_result(None)
                    if self._queued.get(aid) is queued:
                        del self._queued[aid]
            await written

        # A task of its own: a cancelled caller leaves it running, and stop() ends its wait.
        task = asyncio.ensure_future(later())
        self._tasks.add(task)
        self._held.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._held.discard)
        return asyncio.shield(task)

    async def _install_specific(self, aid: str, specific: dict[str, Any]) -> None:
        try:
            await self.filters.install([specific], alert_id=aid)
        except Exception as e:  # the verdict's row and event go on all the same
            self.bus.emit("filter.error", action="install", alert_id=aid, error=repr(e))

    async def _after_row(self, aid: str) -> None:
        """Until the verdict's row of ``aid`` is queued (``_own_work`` may hold it)."""
        queued = self._queued.get(aid)
        if queued is not None:
            await asyncio.shield(queued)

    # --- the overlay.Overlay hooks ----------------------------------------------------------

    def overlay_verify_body(self, envelope_bytes: bytes
                            ) -> VerifyOutcome | Outcome | Awaitable[VerifyOutcome]:
        """``Overlay(verify_body=...)``: the overlay has checked the envelope's form, its hash to
        the announced id and its age; the rest is done here. Our sandbox's run starts first,
        from the overlay's own callback; the signature is checked while it runs (a bad one is
        ``Outcome.FORGED``: the overlay blames the announcer and asks another). The worker
        parses the alert (a signed body that is no alert is refuted: the overlay remembers it
        so); this process parses it for the row and the events, after the verdict. The verdict
        is stored once, with the envelope."""
        own = self._sealed.get(envelope_bytes)
        mine = self._verdicts.get(own) if own is not None else None
        if own is not None and mine is not None:
            # Our own alert, as we signed it, being published: nothing to check.
            self.vstats.cached += 1
            return VerifyOutcome(own, mine[0] != "refuted", mine[1], "stored verdict", 0.0)
        try:
            envelope = decode_envelope(envelope_bytes)
        except FormatError:
            return self._forged()
        aid = encoding_id_hex(envelope.alert_bytes)
        known = self._verdicts.get(aid)
        # Traced on a relay, the worker waited about 0.5 ms for this process to parse the alert
        # and check the signature before its job went out. Now it goes first: a forged
        # envelope, a body that is no alert or an alert for a service not protected here costs
        # one worker run (the last two end at the parse), as a well signed false alert would.
        verifying = (self._verify(envelope.alert_bytes, aid)
                     if known is None and self.by_id else None)
        try:
            envelope.check()
        except SignatureError:
            _abandon(verifying)
            return self._forged()
        except BaseException:
            _abandon(verifying)
            raise
        if known is not None:
            self.vstats.cached += 1
            return VerifyOutcome(aid, known[0] != "refuted", known[1], "stored verdict", 0.0)
        return self._body_verdict(aid, envelope, envelope_bytes, verifying)

    async def _body_verdict(self, aid: str, envelope: Envelope, envelope_bytes: bytes,
                            verifying: asyncio.Future[VerifyOutcome] | None) -> VerifyOutcome:
        d = await self._receive(aid, None, envelope, None, "overlay", envelope_bytes,
                                verifying=verifying)
        return VerifyOutcome(aid, d.state == "verified",
                             "unknown-service" if d.state == "received" else d.reason, "", 0.0)

    def _forged(self) -> Outcome:
        # Nothing stored: the overlay counts it against the announcer (a stored row per
        # made-up alert id would let a forger fill the store until it is banned).
        self.bus.count("alerts.forged")
        return Outcome.FORGED

    async def overlay_on_alert(self, envelope: Envelope, alert: Alert | None) -> None:
        """``Overlay(on_alert=...)``: called once per alert that verified here, before the
        overlay forwards it (the state goes onto the verdict's row, which holds the
        envelope, once that row is queued)."""
        await self.mark_forwarded(encoding_id_hex(envelope.alert_bytes),  # verified here
                                  signer=envelope.node_id.hex())

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        d, v = self.dstats, self.vstats
        st = self.sampler.stats
        return {
            "detector": {
                "enabled": self.detector_enabled, "queue": len(self.sampler),
                "capacity": self.sampler.capacity, "depth": self.sampler.depth(),
                "offered": st.offered, "queued": st.queued, "replaced": st.replaced,
                "superseded": st.superseded,
                "sampled_out": st.sampled_out, "duplicates": st.duplicates,
                "analysed": d.analysed, "stops": d.stops, "interrupted": d.interrupted,
                "detections": d.detections, "alerts": d.alerts,
                "errors": d.errors, "last_ms": round(d.last_ms, 3),
                "avg_ms": round(d.total_ms / d.analysed, 3) if d.analysed else 0.0,
                "last_service": d.last_service, "last_at": d.last_at,
                "busy": self.pools.detect.busy if self.pools.detect else 0,
            },
            "verifier": {
                "runs": v.runs, "verified": v.verified, "refuted": v.refuted,
                "cached": v.cached, "last_ms": round(v.last_ms, 3),
                "avg_ms": round(v.total_ms / v.runs, 3) if v.runs else 0.0,
                "busy": self.pools.fast.busy,
            },
            "pools": self.pools.status(),
            "services": [{"name": i.name, "proto": i.proto, "port": i.port,
                          "service_id": i.service_id.hex()} for i in self.images.values()],
        }


def _row_fields(aid: str, alert_bytes: bytes, alert: Alert | None, origin: str,
                peer: str | None) -> dict[str, Any]:
    """An alert's columns in the store (``alert`` None: parsed from ``alert_bytes`` now; only a
    verified alert comes without, and our worker parsed it, so a failure here only blanks
    the columns)."""
    if alert is None:
        try:
            alert = decode_alert(alert_bytes)
        except FormatError:
            return {"alert_id": aid, "service_id": "", "service": "", "type": "",
                    "alert": alert_bytes, "origin": origin, "from_peer": peer}
    return {"alert_id": aid, "service_id": alert.service_id.hex(),
            "service": alert.service_name, "type": alert.type.value, "alert": alert_bytes,
            "origin": origin, "from_peer": peer}


def _abandon(task: asyncio.Future[Any] | None) -> None:
    """Let a verification nobody waits for any more finish on its own (other copies of the
    same alert may be waiting on it), its outcome read so that nothing warns about it."""
    if task is not None:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _packets_for(alert: Alert, job: Job) -> list[bytes]:
    """The raw packets that carried the alert's messages: those of every submitted message
    whose bytes appear in one of the alert's (the alert keeps messages whole, or joins a
    connection's chunks). All of them if none can be matched."""
    if not job.packets:
        return []
    datas = [m.data for m in alert.messages]
    chosen: list[bytes] = []
    for m, pk in zip(job.messages, job.packets, strict=False):
        if m.data and any(m.data in d for d in datas):
            chosen.extend(p for p in pk if p not in chosen)
    if not chosen:
        for pk in job.packets:
            chosen.extend(p for p in pk if p not in chosen)
    return chosen
