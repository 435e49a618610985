"""The alert pipeline with the real sandbox on the sample services, real process pools and a
real SQLite store; the kernel side is a recording FilterTable-like object."""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import time
from typing import Any

import pytest

from node.daemon import worker
from node.daemon.pipeline import Pipeline
from node.daemon.pools import JobFailed, Pools
from node.daemon.worker import VerifyOutcome
from overlay.broadcast import Outcome
from sca.alert import Alert, ByteRef, ExecutionControl
from sca.codec import alert_id_hex, encode_alert
from sca.envelope import decode_envelope, seal
from sca.keys import NodeKey
from sca.services import traffic


def pipeline(parts: Any, images: list, pools: Pools, *, detector: bool = False,
             broadcast: Any = None, **kw: Any) -> Pipeline:
    return Pipeline(key=NodeKey.generate(), images=images, pools=pools, db=parts.db,
                    bus=parts.bus, filters=parts.filters, detector=detector,
                    broadcast=broadcast, **kw)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def body_verdict(p: Pipeline, envelope: bytes) -> Any:
    """What the overlay's ``verify_body`` hook answers: at once, or once its work is done."""
    r = p.overlay_verify_body(envelope)
    return await r if inspect.isawaitable(r) else r


def exploit_packets(messages: tuple) -> list[list[bytes]]:
    # Stand-ins for the IP packets that carried each message (the stack gives real ones).
    return [[b"\x45pkt" + m.data[:8]] for m in messages]


@pytest.mark.parametrize("service", ["resolver", "mgmtd"])
def test_detector_node_alerts_signs_stores_installs_broadcasts(
        service: str, images: list, pools: Pools, parts_factory: Any,
        rng: random.Random) -> None:
    parts = parts_factory()
    sent: list[bytes] = []

    async def broadcast(envelope: bytes) -> None:
        sent.append(envelope)

    async def main() -> Pipeline:
        p = pipeline(parts, images, pools, detector=True, broadcast=broadcast)
        await p.start()
        t = traffic(service)
        assert p.submit_messages(service, tuple(t.benign(rng))) == "queued"
        assert pools.detect is not None and pools.detect.busy == 1  # its replay is out now
        messages = tuple(t.exploit(rng))
        assert p.submit_messages(service, messages, exploit_packets(messages)) == "queued"
        await p.idle(60)
        # Its publication through the overlay: our own envelope needs no check, a tampered
        # copy of it is forged.
        own = decode_envelope(sent[0])
        mine = await body_verdict(p, sent[0])
        assert not isinstance(mine, Outcome)
        assert mine.verified and mine.detail == "stored verdict"
        tampered = bytearray(sent[0])
        tampered[sent[0].index(own.signature) + 5] ^= 0x01
        assert await body_verdict(p, bytes(tampered)) is Outcome.FORGED
        await p.idle(60)
        await p.stop()
        return p

    p = run(main())
    assert len(sent) == 1
    env = decode_envelope(sent[0])
    alert = env.open()  # the signature is good
    assert env.node_id == p.key.node_id
    aid = alert_id_hex(env.alert_bytes)
    row = parts.store.alert(aid)
    assert row is not None
    assert (row.origin, row.state, row.signer) == ("detected", "forwarded", p.node_id)
    assert row.envelope == sent[0] and row.alert == env.alert_bytes
    assert parts.store.packets(aid)  # kept for traceback
    assert [v.verified for v in parts.store.verifications(aid)] == [True]
    assert alert.service_name == service
    kinds = {f.kind for f in parts.table.installed.values()}
    assert "specific" in kinds and "general" in kinds
    assert {r.filter_id for r in parts.store.filters(state="installed")} == \
        set(parts.table.installed)
    # The specific filter went in, and the alert went out, both before the general filter.
    types = parts.types()
    general = next(i for i, e in enumerate(parts.events)
                   if e["event_type"] == "filter.installed" and e.get("kind") == "general")
    assert types.index("filter.installed") < general and types.index("alert.forwarded") < general
    assert p.dstats.analysed == 2 and p.dstats.detections == 1


def test_a_connections_longer_history_replaces_its_waiting_one(
        images: list, pools: Pools, parts_factory: Any, rng: random.Random) -> None:
    """The stack offers a connection's history at each chunk: while a shorter one still
    waits, the longer one takes its place and the connection is replayed once."""
    parts = parts_factory()
    messages: tuple = ()
    while len(messages) < 2:  # an exploit sent in two chunks
        messages = tuple(traffic("mgmtd").exploit(rng))

    async def main() -> Pipeline:
        p = pipeline(parts, images, pools, detector=True, general_filters=False)
        flow = ("10.77.0.9", 40000, "10.77.0.1", 7700)
        # Offered before the consumers start: both wait.
        assert p.submit_messages("mgmtd", messages[:-1], flow=flow) == "queued"
        assert p.submit_messages("mgmtd", messages, flow=flow) == "superseded"
        await p.start()
        await p.idle(60)
        await p.stop()
        return p

    p = run(main())
    assert p.dstats.analysed == 1 and p.dstats.alerts == 1
    assert p.status()["detector"]["superseded"] == 1


def _three_chunk_exploit() -> tuple:
    rng = random.Random(7)
    messages: tuple = ()
    while len(messages) < 3:  # its first chunk alone is over 512 instructions of replay
        messages = tuple(traffic("mgmtd").exploit(rng))
    return messages


def test_a_replay_can_be_stopped_and_a_late_stop_is_skipped(pools: Pools) -> None:

    # A long replay (tens of thousands of instructions, tens of ms, the longest benign exchange
    # ten times over): the stop reaches it mid-run even on a loaded machine (one exchange alone,
    # ~4 ms, once ended before the stop came).
    rng = random.Random(1)
    longest = max((tuple(traffic("resolver").benign(rng)) for _ in range(12)),
                  key=lambda m: sum(len(x.data) for x in m)) * 10

    async def main() -> None:
        whole = await pools.detect.run(worker.detect, "resolver", longest, timeout=60)
        assert not whole.interrupted and whole.instructions > 20000, whole
        job = asyncio.ensure_future(pools.detect.run(worker.detect, "resolver", longest,
                                                     timeout=60, key="conn"))
        while not pools.detect.interrupt("conn"):  # once the job is out to its worker
            await asyncio.sleep(0)
        out = await job
        assert out.interrupted and not out.detected
        assert out.instructions % 512 == 0 and out.instructions < whole.instructions
        assert not pools.detect.interrupt("conn")  # nothing runs under that name now
        # A stop that comes after its job ended waits in the pipe: the next job skips it.
        again = await pools.detect.run(worker.detect, "resolver", longest, timeout=60)
        assert not again.interrupted and again.instructions == whole.instructions

    run(main())


def test_a_longer_history_stops_the_running_replay_of_the_shorter(
        images: list, pools: Pools, parts_factory: Any) -> None:
    """A connection's first chunk is being replayed when the rest of the request comes: that
    replay stops and the whole history is replayed (and detected) right after it."""
    parts = parts_factory()
    messages = _three_chunk_exploit()
    flow = ("10.77.0.9", 40001, "10.77.0.1", 7700)

    async def main() -> Pipeline:
        p = pipeline(parts, images, pools, detector=True, general_filters=False)
        await p.start()
        assert p.submit_messages("mgmtd", messages[:1], flow=flow) == "queued"
        while ("mgmtd", flow) not in p._replaying:
            await asyncio.sleep(0)
        assert p.submit_messages("mgmtd", messages, flow=flow) == "queued"
        await p.idle(60)
        await p.stop()
        return p

    p = run(main())
    st = p.status()["detector"]
    assert st["stops"] == 1  # sent while the first chunk's replay ran
    # It stops at its next checkpoint (every 512 instructions) unless it ended first (a
    # loaded machine); either way the whole request is replayed and detected.
    assert st["interrupted"] + st["analysed"] == 2 and st["interrupted"] <= 1
    assert (st["alerts"], st["errors"]) == (1, 0)


def test_benign_traffic_raises_nothing(images: list, pools: Pools, parts_factory: Any,
                                       rng: random.Random) -> None:
    parts = parts_factory()

    async def main() -> None:
        p = pipeline(parts, images, pools, detector=True)
        await p.start()
        for _ in range(5):
            p.submit_messages("resolver", tuple(traffic("resolver").benign(rng)))
        await p.idle(60)
        await p.stop()

    run(main())
    assert parts.store.alerts() == [] and parts.table.installed == {}


@pytest.fixture(scope="module")
def envelopes(images: list) -> dict[str, tuple[bytes, Alert]]:
    """A signed, verified alert per sample (made once, as a detector would)."""
    from sca.generate import Detector
    from sca.verify import Verifier

    key = NodeKey.generate()
    out = {}
    rng = random.Random(11)
    for img in images:
        messages = tuple(traffic(img.name).exploit(rng))
        d = Detector(img)
        run_ = d.inspect(messages)
        assert run_.detection is not None
        gen = d.generate(messages, run_.detection, Verifier([img]))
        assert gen is not None
        blob = encode_alert(gen.alert)
        out[img.name] = (seal(blob, key, time.time()).encode(), gen.alert)
    return out


def test_a_relays_own_filter_and_row_wait_until_the_alert_is_handed_over(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    """Propagation first: a verified alert's filter and store row here wait for the overlay's
    hand-off (the fetches it invited downstream); the filter goes in first, the row follows,
    and what arrives meanwhile (a copy of the alert, our own detection of the same exploit)
    is recorded after it: the row ends forwarded, and the alert is not published twice."""
    parts = parts_factory()
    env, alert = envelopes["resolver"]
    aid = alert_id_hex(encode_alert(alert))
    sent: list[bytes] = []

    async def main() -> None:
        released = asyncio.Event()
        asked: list[tuple[bytes, float]] = []

        async def handoff(alert_id: bytes, timeout: float) -> bool:
            asked.append((alert_id, timeout))
            await released.wait()
            return True

        p = pipeline(parts, images, pools, serve_first_s=0.5, general_filters=False,
                     detector=True, broadcast=sent.append)
        p.handoff = handoff
        await p.start()
        verdict = await body_verdict(p, env)
        assert verdict.verified
        forwarded = asyncio.ensure_future(p.overlay_on_alert(decode_envelope(env), alert))
        copy = asyncio.ensure_future(p.on_overlay_alert(env, ("10.77.0.9", 7400),
                                                        origin="import"))
        assert p.submit_messages("resolver", alert.messages) == "queued"
        end = time.monotonic() + 30
        while p.dstats.detections == 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        assert p.dstats.detections == 1  # our own detection of it waits too
        assert asked == [(bytes.fromhex(aid), 0.5)]
        assert await p.db(p.db.store.alert, aid) is None  # nothing written yet
        assert parts.table.installed == {}  # nor installed
        assert not forwarded.done() and not copy.done()
        released.set()
        await forwarded
        assert (await copy).duplicate
        await p.idle(60)
        await p.stop()

    run(main())
    row = parts.store.alert(aid)
    assert row is not None and row.state == "forwarded" and row.envelope == env
    assert row.seen_count >= 2
    assert sent == []  # detected again, not published again
    assert {f.kind for f in parts.table.installed.values()} == {"specific"}
    types = parts.types()
    assert "alert.detected_again" in types
    assert types.index("filter.installed") < types.index("alert.verified")
    verified = next(e for e in parts.events if e["event_type"] == "alert.verified")
    assert verified["verdict_at_s"] <= verified["timestamp_s"]


def test_a_stop_during_the_hand_off_loses_no_row(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    """A node stopped while a verified alert waits for its hand-off still writes its row."""
    parts = parts_factory()
    env, alert = envelopes["resolver"]
    aid = alert_id_hex(encode_alert(alert))

    async def main() -> None:
        async def handoff(alert_id: bytes, timeout: float) -> bool:
            await asyncio.sleep(3600)  # never hands over: stop() has to end the wait
            return True

        p = pipeline(parts, images, pools, serve_first_s=0.5, general_filters=False)
        p.handoff = handoff
        assert (await body_verdict(p, env)).verified
        await asyncio.sleep(0.05)
        await p.stop()
        assert await p.db(p.db.store.alert, aid) is not None

    run(main())
    row = parts.store.alert(aid)
    assert row is not None and row.state == "verified" and row.envelope == env


def test_receiving_node_verifies_installs_and_forwards_once(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    parts = parts_factory()
    env, alert = envelopes["resolver"]

    async def main() -> tuple:
        p = pipeline(parts, images, pools)
        first = await p.on_overlay_alert(env, ("10.77.0.1", 7400))
        second = await p.on_overlay_alert(env, ("10.77.0.2", 7400))
        await p.idle(60)
        assert p.vstats.runs == 1  # the second copy met the verdict kept in memory
        if first.forward:
            await p.mark_forwarded(first.alert_id)
        # After a restart the verdict comes from the store: still not forwarded twice, and
        # a started pipeline holds the store's verdicts from the start (no sandbox run).
        again = await pipeline(parts, images, pools).on_overlay_alert(env, ("10.77.0.3", 7400))
        assert (again.state, again.forward, again.duplicate) == ("verified", False, True)
        restarted = pipeline(parts, images, pools)
        await restarted.start()
        fourth = await restarted.on_overlay_alert(env, ("10.77.0.4", 7400))
        assert (fourth.state, fourth.forward, fourth.duplicate) == ("verified", False, True)
        assert restarted.vstats.runs == 0
        await restarted.stop()
        return first, second

    first, second = run(main())
    aid = alert_id_hex(encode_alert(alert))
    assert (first.alert_id, first.state, first.forward) == (aid, "verified", True)
    assert (second.state, second.forward, second.duplicate) == ("verified", False, True)
    row = parts.store.alert(aid)
    assert row is not None and row.state == "forwarded" and row.from_peer == "10.77.0.1:7400"
    assert row.envelope == env and row.seen_count == 4
    assert len(parts.store.verifications(aid)) == 1  # the copy was not re-verified
    assert {f.kind for f in parts.table.installed.values()} == {"specific", "general"}

def test_general_filter_waits_for_the_alerts_burst(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    """The specific filter goes in at once; deriving the general one starts only
    ``general_delay_s`` after the alert verified (the forward and the neighbours' fetches go
    first), then it is installed as usual."""
    parts = parts_factory()
    env, _ = envelopes["resolver"]

    async def main() -> tuple[set[str], float]:
        p = pipeline(parts, images, pools, general_delay_s=1.0)
        d = await p.on_overlay_alert(env, ("10.77.0.1", 7400))
        assert (d.state, d.forward) == ("verified", True)
        verified_at = time.monotonic()
        await asyncio.sleep(0.3)
        early = {f.kind for f in parts.table.installed.values()}
        assert pools.filters.busy == 0  # not even started
        await p.idle(60)
        return early, time.monotonic() - verified_at

    early, took = run(main())
    assert early == {"specific"}
    assert {f.kind for f in parts.table.installed.values()} == {"specific", "general"}
    assert took >= 1.0



def test_forged_signature_is_refuted_and_never_forwarded(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    parts = parts_factory()
    env, _ = envelopes["resolver"]
    forged = bytearray(env)
    forged[env.index(decode_envelope(env).signature) + 10] ^= 0x40  # inside the signature

    async def main() -> tuple:
        p = pipeline(parts, images, pools)
        bad = await p.on_overlay_alert(bytes(forged), "peer-x")
        good = await p.on_overlay_alert(env, "peer-y")  # the genuine one still counts
        await p.idle(60)
        return bad, good

    bad, good = run(main())
    assert (bad.state, bad.forward, bad.reason) == ("refuted", False, "bad-signature")
    assert (good.state, good.forward) == ("verified", True)
    row = parts.store.alert(bad.alert_id)
    assert row is not None and row.state == "verified" and row.envelope == env


def test_refuted_alert_is_stored_remembered_and_not_forwarded(
        images: list, pools: Pools, parts_factory: Any, rng: random.Random) -> None:
    parts = parts_factory()
    resolver = next(i for i in images if i.name == "resolver")
    benign = max(traffic("resolver").benign(rng), key=lambda m: len(m.data))
    mid = len(benign.data) // 2
    lie = Alert(resolver.service_id, "resolver", (benign,),
                ExecutionControl(tuple(ByteRef(0, mid + i) for i in range(4))))
    env = seal(encode_alert(lie), NodeKey.generate(), time.time()).encode()

    async def main() -> tuple:
        p = pipeline(parts, images, pools)
        a = await p.on_overlay_alert(env, "liar")
        b = await p.on_overlay_alert(env, "liar")
        await p.idle(30)
        return a, b

    a, b = run(main())
    assert (a.state, a.forward) == ("refuted", False) and a.reason == "trap-not-reached"
    assert (b.state, b.forward, b.duplicate) == ("refuted", False, True)
    assert len(parts.store.verifications(a.alert_id)) == 1
    row = parts.store.alert(a.alert_id)
    assert row is not None and row.state == "refuted" and row.signer
    assert parts.table.installed == {}
    assert "alert.refuted" in parts.types()


def test_malformed_envelopes(images: list, pools: Pools, parts_factory: Any) -> None:
    parts = parts_factory()

    async def main() -> list:
        p = pipeline(parts, images, pools)
        return [await p.on_overlay_alert(b"\xa1\x00garbage", "p"),
                await p.on_overlay_alert(b"x" * 200_000, "p"),
                await p.on_overlay_alert("text", "p")]  # type: ignore[arg-type]

    for d in run(main()):
        assert (d.state, d.forward) == ("malformed", False)
    assert parts.store.alerts() == []
    assert parts.types().count("alert.malformed") == 3


def test_unknown_service_cannot_be_verified(parts_factory: Any, envelopes: dict) -> None:
    from sca.services import manifest_path

    parts = parts_factory()
    env, _ = envelopes["resolver"]
    only_mgmtd = Pools([manifest_path("mgmtd")], fast_workers=1)
    try:
        async def main() -> Any:
            await only_mgmtd.warm()
            from sca.emu.image import load_image

            p = pipeline(parts, [load_image(manifest_path("mgmtd"))], only_mgmtd)
            return await p.on_overlay_alert(env, "p"), await body_verdict(p, env)

        d, v = run(main())
    finally:
        only_mgmtd.close()
    assert (d.state, d.forward, d.reason) == ("received", False, "unknown-service")
    assert (v.verified, v.reason) == (False, "unknown-service")  # the overlay's hook says so
    assert parts.store.alert(d.alert_id).state == "received"  # type: ignore[union-attr]


def test_operator_removed_filter_does_not_come_back(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    parts = parts_factory()
    env, _ = envelopes["mgmtd"]

    async def main() -> list[str]:
        p = pipeline(parts, images, pools, general_filters=False)
        d = await p.on_overlay_alert(env, "p")
        await p.idle(30)
        ids = list(parts.table.installed)
        assert await parts.filters.remove(ids) == ids
        # The same alert again, even re-verified from scratch (after a restart), installs
        # nothing.
        parts.store.set_alert_state(d.alert_id, "received")
        p = pipeline(parts, images, pools, general_filters=False)
        await p.on_overlay_alert(env, "q")
        await p.idle(30)
        return ids

    ids = run(main())
    assert parts.table.installed == {}
    assert "filter.skipped" in parts.types()
    assert all(parts.store.filter(i).removed_by == "operator" for i in ids)  # type: ignore[union-attr]


def test_overlay_hooks(images: list, pools: Pools, parts_factory: Any,
                       envelopes: dict) -> None:
    """``Overlay(verify_body=..., on_alert=...)``: the signature and the sandbox's verdict,
    stored once with the envelope; a forged signature is FORGED (the overlay blames the
    announcer), stored nowhere, also for a copy of an alert verified here."""
    parts = parts_factory()
    env_bytes, alert = envelopes["resolver"]
    env = decode_envelope(env_bytes)
    forged = bytearray(env_bytes)
    forged[env_bytes.index(env.signature) + 10] ^= 0x40  # inside the signature

    async def main() -> tuple:
        p = pipeline(parts, images, pools, general_filters=False)
        bad = await body_verdict(p, bytes(forged))
        assert parts.store.alert(alert_id_hex(env.alert_bytes)) is None
        v = await body_verdict(p, env_bytes)  # what the overlay asks
        await p.overlay_on_alert(env, alert)  # then, before it forwards
        again = await body_verdict(p, env_bytes)
        cached = p.vstats.cached
        bad_copy = await body_verdict(p, bytes(forged))
        assert p.vstats.cached == cached
        await p.idle(30)
        return bad, v, again, bad_copy, p

    bad, v, again, bad_copy, p = run(main())
    assert bad is Outcome.FORGED and bad_copy is Outcome.FORGED
    assert v.verified and v.reason == "verified"
    assert again.verified and again.detail == "stored verdict"
    assert p.vstats.runs == 1
    row = parts.store.alert(v.alert_id)
    assert row is not None and row.state == "forwarded" and row.envelope == env_bytes
    assert row.signer == env.node_id.hex() and row.seen_count == 1
    assert len(parts.table.installed) == 1
    forwarded = [e for e in parts.events if e["event_type"] == "alert.forwarded"]
    assert [e.get("signer") for e in forwarded] == [env.node_id.hex()]


def test_a_relays_sandbox_run_starts_before_its_own_checks(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    """On a relay the worker's job goes out first, from the overlay's own callback: when the
    hook returns (the signature checked meanwhile, the alert not parsed here yet), the job is
    with the worker already; the verdict, the row and the filter follow."""
    parts = parts_factory()
    env, alert = envelopes["resolver"]

    async def main() -> Any:
        p = pipeline(parts, images, pools, general_filters=False)
        await p.start()
        pending = p.overlay_verify_body(env)
        assert inspect.isawaitable(pending) and pools.fast.busy == 1
        v = await pending
        await p.idle(30)
        await p.stop()
        return v

    v = run(main())
    assert v.verified
    row = parts.store.alert(alert_id_hex(encode_alert(alert)))
    assert row is not None and (row.state, row.service) == ("verified", "resolver")
    assert len(parts.table.installed) == 1


def test_a_copy_giving_up_leaves_the_verification_to_the_others(
        images: list, pools: Pools, parts_factory: Any, envelopes: dict) -> None:
    """One sandbox run serves every copy of an alert that arrives while it runs; the first
    copy's caller giving up (an operator's import whose request went away) leaves the
    overlay's copy its verdict."""
    parts = parts_factory()
    env, alert = envelopes["resolver"]

    async def main() -> Any:
        p = pipeline(parts, images, pools, general_filters=False)
        await p.start()
        first = asyncio.ensure_future(p.on_overlay_alert(env, "operator", origin="import"))
        await asyncio.sleep(0)  # its job is out
        copy = asyncio.ensure_future(body_verdict(p, env))
        await asyncio.sleep(0)
        first.cancel()
        v = await copy
        await p.idle(30)
        await p.stop()
        return v, p.vstats.runs

    v, runs = run(main())
    assert v.verified and runs == 1
    row = parts.store.alert(alert_id_hex(encode_alert(alert)))
    assert row is not None and row.state == "verified"


def test_a_stop_right_after_a_submission_leaves_nothing_running(
        images: list, pools: Pools, parts_factory: Any, rng: random.Random) -> None:
    """A detection taken and stopped before it ran (the node stopping as a packet came) is
    given up whole: its replay, its place among the running ones."""
    parts = parts_factory()

    async def main() -> None:
        p = pipeline(parts, images, pools, detector=True)
        await p.start()
        messages = tuple(traffic("resolver").exploit(rng))
        assert p.submit_messages("resolver", messages) == "queued"
        await p.stop()
        await p.idle(5)  # nothing is left counted as running

    run(main())


def test_sampling_under_load_keeps_the_queue_bounded(images: list, pools: Pools,
                                                    parts_factory: Any,
                                                    rng: random.Random) -> None:
    parts = parts_factory()

    async def main() -> Pipeline:
        p = pipeline(parts, images, pools, detector=True, queue_size=4)
        await p.start()
        outcomes = [p.submit_messages("resolver", tuple(traffic("resolver").benign(rng)))
                    for _ in range(300)]
        assert len(p.sampler) <= 4
        assert "sampled-out" in outcomes or "replaced" in outcomes
        assert p.submit_messages("nope", ()).startswith("refused")
        assert p.submit_messages("resolver", ()).startswith("refused")
        await p.idle(120)
        await p.stop()
        return p

    p = run(main())
    st = p.status()["detector"]
    assert st["offered"] == 300 and st["analysed"] <= 300 - st["sampled_out"]
    assert st["sampled_out"] + st["duplicates"] + st["replaced"] > 0


def test_a_dead_worker_restarts_its_lane(pools: Pools) -> None:
    async def main() -> None:
        with pytest.raises(JobFailed, match="died"):
            await pools.fast.run(os._exit, 3)
        assert pools.fast.restarts >= 1
        assert isinstance(await pools.fast.run(os.getpid, timeout=30), int)

    run(main())


def test_detection_does_not_wait_behind_general_filters(
        pools: Pools, envelopes: dict, rng: random.Random) -> None:
    """General filters are derived in a lane of their own, at a lower CPU priority: an exploit
    caught while two general filters are being derived is found before they are done."""

    async def main() -> None:
        base = os.getpriority(os.PRIO_PROCESS, 0)
        for pid in await pools.filters.warm():
            assert os.getpriority(os.PRIO_PROCESS, pid) >= min(base + 10, 19)  # 19: lowest
        for pid in await pools.detect.warm():
            assert os.getpriority(os.PRIO_PROCESS, pid) == base
        alert_bytes = encode_alert(envelopes["mgmtd"][1])
        general = [asyncio.ensure_future(pools.filters.run(worker.filters, alert_bytes,
                                                           timeout=120)) for _ in range(2)]
        await asyncio.sleep(0.05)
        messages = tuple(traffic("resolver").exploit(rng))
        out = await pools.detect.run(worker.detect, "resolver", messages, timeout=60)
        assert out.detected and out.alert is not None
        assert not all(g.done() for g in general)  # still deriving when the alert was ready
        done = await asyncio.gather(*general)
        assert all(o.error is None and o.filters for o in done)

    run(main())


def test_exploit_is_not_held_back_behind_a_benign_replay(
        images: list, parts_factory: Any, rng: random.Random) -> None:
    """With the default number of detect workers, an exploit that arrives just after a long
    benign conversation is replayed beside it, not after it: its alert is out while the benign
    replay still runs."""
    from node.daemon.config import DetectorConfig
    from sca.alert import Message
    from sca.services import manifest_path

    workers = DetectorConfig().workers
    assert workers >= 2
    long_benign: list[Message] = []
    while len(long_benign) < 48:  # several sessions, one history: a replay of tens of ms
        base = max((m.connection or 0 for m in long_benign), default=-1) + 1
        long_benign += [Message(m.data, (m.connection or 0) + base)
                        for m in traffic("mgmtd").benign(rng)]
    parts = parts_factory()
    analysed_at_alert: list[int] = []
    own = Pools([manifest_path(n) for n in ("resolver", "mgmtd")], detectors=True,
                detect_workers=workers)

    async def main() -> Pipeline:
        await own.warm()
        p = pipeline(parts, images, own, detector=True, detect_concurrency=workers)
        parts.bus.subscribe(lambda e: analysed_at_alert.append(p.dstats.analysed)
                            if e["event_type"] == "alert.detected" else None)
        await p.start()
        assert p.submit_messages("mgmtd", long_benign[:64]) == "queued"
        exploit = tuple(traffic("resolver").exploit(rng))
        assert p.submit_messages("resolver", exploit[-1:]) == "queued"
        await p.idle(60)
        await p.stop()
        return p

    try:
        p = run(main())
    finally:
        own.close()
    assert (p.dstats.analysed, p.dstats.detections) == (2, 1)
    assert analysed_at_alert == [1]  # the benign replay had not finished


@pytest.mark.parametrize("protects", [True, False])
def test_overlay_hook_refutes_a_signed_body_that_is_no_alert(
        images: list, pools: Pools, parts_factory: Any, protects: bool) -> None:
    """The overlay parses no alert (``verify_body``): a well signed envelope around bytes that
    are no alert is refuted here (the overlay remembers it so) and stores nothing, by the
    worker's parse or, on a node that protects no service (no job), by its own; the pool
    goes on working."""
    from sca.envelope import Envelope, signed_message

    parts = parts_factory()
    key = NodeKey.generate()
    junk = b"\xa1\x61v\x01"  # CBOR, but no alert
    signed_at = int(time.time() * 1000)
    env = Envelope(junk, key.public_bytes, signed_at,
                   key.sign(signed_message(junk, signed_at))).encode()
    decode_envelope(env).check()  # the signature is good

    async def main() -> Any:
        p = pipeline(parts, images if protects else [], pools, general_filters=False)
        v = await body_verdict(p, env)
        await p.idle(30)
        return v

    v = run(main())
    assert isinstance(v, VerifyOutcome)
    assert (v.verified, v.reason) == (False, "malformed")
    assert parts.store.alerts() == []
    assert parts.types() == ["alert.malformed"]
    assert run(pools.fast.run(worker.ping, timeout=30)) > 0
