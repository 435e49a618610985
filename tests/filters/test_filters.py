"""Filters from verified alerts: generation, one condition model, nftables in a namespace."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from filters.condition import Filter, Specific, condition_from_json
from filters.generate import (
    SPECIFIC_BYTES,
    FilterGenerationError,
    Generated,
    generate_filters,
    specific_filter,
)
from filters.nft import MAX_SET_BYTES, compile_filter
from filters.userspace import UserspaceFilters
from node.kernel.marks import MASK, QUEUE_STACK
from sca.alert import Message
from sca.emu.image import ServiceImage, load_image
from sca.generate import Detector
from sca.services import SAMPLES, manifest_path, traffic
from sca.verify import Verifier

MUTANTS = 150
BENIGN_SESSIONS = 400
PROBE = Path(__file__).with_name("netns_probe.py")


def streams(messages: list[Message]) -> list[bytes]:
    """What a filter sees: each datagram, or each connection's reassembled stream."""
    if messages[0].connection is None:
        return [m.data for m in messages]
    conns: dict[int | None, bytes] = {}
    for m in messages:
        conns[m.connection] = conns.get(m.connection, b"") + m.data
    return list(conns.values())


@pytest.fixture(scope="module")
def made() -> dict[str, tuple[ServiceImage, Detector, Verifier, Generated]]:
    out = {}
    for name in SAMPLES:
        image = load_image(manifest_path(name))
        det, ver = Detector(image), Verifier([image])
        msgs = tuple(traffic(name).exploit())
        run = det.inspect(msgs)
        assert run.detection is not None
        g = det.generate(msgs, run.detection, ver)
        assert g is not None
        # A small benign corpus (other seeds than the checks below use), as a node's log has.
        corpus_rng = random.Random(99)
        corpus = [m for _ in range(30) for m in traffic(name).benign(corpus_rng)]
        out[name] = (image, det, ver, generate_filters(g.alert, image, detector=det,
                                                       verifier=ver, benign=corpus))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLES)
def test_general_filter_blocks_confirmed_mutants_and_passes_benign(name: str, made) -> None:  # type: ignore[no-untyped-def]
    _image, det, _, gen = made[name]
    assert gen.general is not None, gen.notes
    t = traffic(name)
    rng = random.Random(11)
    blocked = confirmed = 0
    for i in range(MUTANTS):
        mutant = t.exploit(random.Random(10_000 + i))
        if det.inspect(tuple(mutant)).detection is None:
            continue  # only mutants that still exploit in the sandbox count
        confirmed += 1
        blocked += any(gen.general.matches(s) for s in streams(mutant))
    assert confirmed >= MUTANTS * 0.9
    assert blocked == confirmed
    false_positives = [s for _ in range(BENIGN_SESSIONS) for s in streams(t.benign(rng))
                       if gen.general.matches(s)]
    assert false_positives == []


@pytest.mark.parametrize("name", SAMPLES)
def test_specific_filter_is_the_exploits_bytes(name: str, made) -> None:  # type: ignore[no-untyped-def]
    _, _, _, gen = made[name]
    exploit = streams(traffic(name).exploit())
    assert any(gen.specific.matches(s) for s in exploit)
    rng = random.Random(5)
    assert not any(gen.specific.matches(s) for _ in range(200) for s in streams(
        traffic(name).benign(rng)))


def test_no_specific_filter_that_matches_a_benign_request(made) -> None:  # type: ignore[no-untyped-def]
    """A verified alert can be made to put benign bytes where its specific filter looks: such
    a filter is not made (the general one still is)."""
    image, det, ver, _ = made["resolver"]
    msgs = tuple(traffic("resolver").exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)
    assert g is not None
    spec = specific_filter(g.alert, image)
    lookalike = b"\x07" + msgs[0].data[1:]  # another request, the same bytes there
    assert spec.condition.offset > 0 and spec.matches(lookalike)
    with pytest.raises(FilterGenerationError, match="benign"):
        specific_filter(g.alert, image, [Message(lookalike)])
    gen = generate_filters(g.alert, image, detector=det, verifier=ver,
                           benign=[Message(lookalike)])
    assert gen.specific is None and gen.general is not None
    assert any("no specific filter" in n for n in gen.notes)
    # The service's own benign request (its manifest's warmup) is always in the corpus.
    warm = dataclasses.replace(image, warmup=lookalike)
    with pytest.raises(FilterGenerationError):
        specific_filter(g.alert, warm)


LOOKALIKES = {  # benign requests that reach the vulnerable function's neighbourhood
    "httpd": b"GET /index.html HTTP/1.0\r\nReferer: https://www.example.com/url?sa=t&ved=2ahU"
             + b"x" * 180 + b"\r\nUser-Agent: curl/7.88.1\r\n\r\n",
    "mgmtd": b"RUN reboot please-schedule-after-the-nightly-backup-finishes\n",
}


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_a_general_filter_made_as_a_node_makes_it_passes_lookalikes(name: str) -> None:
    """With no corpus but the service's own benign request (as the node's filter lane runs):
    a '?' in a header is no query, and a command that is not one is no run."""
    image = load_image(manifest_path(name))
    det, ver = Detector(image), Verifier([image])
    msgs = tuple(traffic(name).exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)
    assert g is not None
    gen = generate_filters(g.alert, image, detector=det, verifier=ver)
    assert gen.general is not None and any(gen.general.matches(s) for s in streams(list(msgs)))
    request = LOOKALIKES[name]
    assert det.inspect((Message(request, 0),)).detection is None  # benign, by the sandbox
    assert not gen.general.matches(request)


def test_a_commands_general_filter_made_as_a_node_makes_it_covers_every_command() -> None:
    """mgmtd's tag overflow is reached through each of its four commands; with no corpus but
    its own benign request, the node learns the others from the words stored beside the
    exploit's command in the binary, each confirmed by replay (before: two of four)."""
    image = load_image(manifest_path("mgmtd"))
    det, ver = Detector(image), Verifier([image])
    msgs = tuple(traffic("mgmtd").exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)
    assert g is not None
    gen = generate_filters(g.alert, image, detector=det, verifier=ver)
    assert gen.general is not None
    for cmd in (b"status", b"who", b"uptime", b"disk"):
        variant = b"RUN " + cmd + b" " + b"B" * 32 + b"/bin/ls\n"
        assert det.inspect((Message(variant, 0),)).detection is not None, cmd
        assert gen.general.matches(variant), cmd
    assert not gen.general.matches(b"RUN reboot " + b"B" * 32 + b"/bin/ls\n")


def test_a_general_filter_that_misses_its_own_exploit_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a relaxation got wrong (here: a stop byte the exploit itself has before its
    delimiter), no filter that does not match the exploit is kept, and generation says so."""
    import filters.generate as generate

    image = load_image(manifest_path("httpd"))
    det, ver = Detector(image), Verifier([image])
    msgs = tuple(traffic("httpd").exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)
    assert g is not None and b"." in msgs[0].data.split(b"?")[0]
    monkeypatch.setattr(generate, "_stops", lambda *args: (ord("."),))
    gen = generate_filters(g.alert, image, detector=det, verifier=ver)
    assert gen.general is None and gen.specific is not None
    assert "general filter dropped: it does not match the exploit" in gen.notes


def test_every_kept_condition_says_why(made) -> None:  # type: ignore[no-untyped-def]
    for name, (_, _, _, gen) in made.items():
        assert gen.general is not None, name
        for line in gen.general.condition.describe() if gen.general else []:
            assert "(" in line or "anywhere" in line, (name, line)
        assert gen.notes, name


def test_condition_json_round_trips_and_refuses_garbage(made) -> None:  # type: ignore[no-untyped-def]
    for _, _, _, gen in made.values():
        for f in (gen.specific, gen.general):
            if f is None:
                continue
            back = condition_from_json(json.loads(json.dumps(f.to_json()["condition"])))
            assert Filter(f.service_id, f.service_name, f.proto, f.port, back).filter_id == \
                f.filter_id
    for bad in ({}, {"x": {}}, {"general": {"pins": [{"offset": -1, "value": 1}]}},
                {"general": {"pins": [], "overflow": {"kind": "terminated", "reach": 0,
                                                       "field": {"offset": 0}}}},
                {"specific": {"offset": "1", "value": "00"}}):
        with pytest.raises(ValueError):
            condition_from_json(bad)  # type: ignore[arg-type]


def test_userspace_and_filter_agree(made) -> None:  # type: ignore[no-untyped-def]
    us = UserspaceFilters()
    for _, _, _, gen in made.values():
        if gen.general is not None:
            us.add(gen.general)
    rng = random.Random(3)
    for name in SAMPLES:
        t = traffic(name)
        port = load_image(manifest_path(name)).port
        proto = load_image(manifest_path(name)).proto
        for s in streams(t.exploit(rng)) + streams(t.benign(rng)):
            hit = us.check(proto, port, s)
            gen = made[name][3].general
            assert (hit is not None) == (gen is not None and gen.matches(s))


def test_udp_general_filter_compiles_to_kernel_and_tcp_goes_to_user_space(made) -> None:  # type: ignore[no-untyped-def]
    r = compile_filter(made["resolver"][3].general, queue_mark=QUEUE_STACK, mark_mask=MASK)
    assert not r.userspace and "@ih,0,8 0x04" in r.rules[0]
    h = compile_filter(made["httpd"][3].general, queue_mark=QUEUE_STACK, mark_mask=MASK)
    assert h.userspace and h.set_rule is not None and f"| {QUEUE_STACK:#010x}" in h.set_rule


def test_specific_filters_in_sets_only_on_datagrams_and_within_a_set_key(made) -> None:  # type: ignore[no-untyped-def]
    """A TCP specific is checked on the stream (``@ih`` counts from each segment), and a value
    longer than a set key can hold in user space (libnftables aborts on a longer key)."""
    spec = made["resolver"][3].specific
    assert not compile_filter(spec, queue_mark=QUEUE_STACK, mark_mask=MASK).userspace
    for f in (made["httpd"][3].specific, dataclasses.replace(
            spec, condition=Specific(3, bytes(range(MAX_SET_BYTES + 1))))):
        c = compile_filter(f, queue_mark=QUEUE_STACK, mark_mask=MASK)
        assert c.userspace and c.element is not None and c.element[0] == f"uq_{f.proto}_{f.port}"
        assert c.set_rule is not None and f"| {QUEUE_STACK:#010x}" in c.set_rule


@pytest.mark.parametrize("name", SAMPLES)
def test_specific_filter_compares_the_bytes_up_to_the_alerts_offsets(name: str, made) -> None:  # type: ignore[no-untyped-def]
    """Not the offsets' bytes alone (the verifier's own value goes there, so they are the
    exploit author's free choice: one byte for code execution)."""
    _, det, ver, gen = made[name]
    msgs = tuple(traffic(name).exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)
    assert g is not None
    c = gen.specific.condition
    stream = streams(list(g.alert.messages))[0]
    offs = [r.offset for r in g.alert.refs()]  # the samples' exploits are one message
    assert len(c.value) >= min(SPECIFIC_BYTES, len(stream))
    assert c.offset <= min(offs) and c.offset + len(c.value) > max(offs)
    assert stream[c.offset:c.offset + len(c.value)] == c.value


def _probe(netns, request: dict[str, object]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    out = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, str(PROBE)],
                         input=json.dumps(request), capture_output=True, text=True, timeout=60,
                         cwd=str(PROBE.parents[2]))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.netns
def test_kernel_drops_udp_exploits_and_passes_benign(netns, made) -> None:  # type: ignore[no-untyped-def]
    _image, _, _, gen = made["resolver"]
    t = traffic("resolver")
    rng = random.Random(8)
    exploits = [d for i in range(10) for d in streams(t.exploit(random.Random(i)))
                if gen.general.matches(d)]
    benign = [d for _ in range(10) for d in streams(t.benign(rng))]
    req = {"cmd": "udp", "port": 1434, "filters": [gen.specific.to_json(), gen.general.to_json()],
           "data": [d.hex() for d in exploits + benign]}
    out = _probe(netns, req)
    delivered = out["delivered"]
    assert delivered[:len(exploits)] == [False] * len(exploits)
    assert delivered[len(exploits):] == [True] * len(benign)
    assert sum(out["listed"].values()) >= len(exploits)  # counters count the drops


@pytest.mark.netns
def test_a_failed_batch_leaves_the_ruleset_as_it_was(netns, made) -> None:  # type: ignore[no-untyped-def]
    _, _, _, gen = made["resolver"]
    out = _probe(netns, {"cmd": "atomic", "filters": [gen.specific.to_json()]})
    assert out == {"failed": True, "same": True}


def _herdwall(*args: str, netns: str | None = None,
              stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).with_name("herdwall"))
    argv = ([*("ip", "netns", "exec", netns)] if netns else []) + [exe, *args]
    r = subprocess.run(argv, capture_output=True, timeout=120, input=stdin)
    return subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.fixture(scope="module")
def resolver_alert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli")
    exploit, benign = d / "exploit.bin", d / "benign.bin"
    exploit.write_bytes(traffic("resolver").exploit()[0].data)
    benign.write_bytes(b"\x04MSSQLSERVER\x00")
    alert = d / "alert.cbor"
    r = _herdwall("alert", "detect", str(manifest_path("resolver")), str(exploit), "-o", str(alert))
    assert r.returncode == 0, r.stderr
    return alert, d


def test_cli_filter_generate_and_test(resolver_alert: tuple[Path, Path]) -> None:
    alert, d = resolver_alert
    m = str(manifest_path("resolver"))
    g = _herdwall("filter", "generate", m, str(alert), "--json")
    assert g.returncode == 0, g.stderr
    doc = json.loads(g.stdout)
    assert {f["kind"] for f in doc["filters"]} == {"specific", "general"}
    assert all(f["nft"] for f in doc["filters"])
    spec = next(f for f in doc["filters"] if f["kind"] == "specific")
    assert any(" @spec_udp_" in s and "drop" in s for s in spec["nft"])  # the set's rule too
    t = _herdwall("filter", "test", m, str(alert), str(d / "exploit.bin"), str(d / "benign.bin"))
    assert t.returncode == 0, t.stderr
    lines = t.stdout.strip().splitlines()
    assert "blocked" in lines[0] and lines[1].endswith("passed")


@pytest.mark.netns
def test_cli_filter_install_list_remove_in_a_namespace(netns, resolver_alert) -> None:  # type: ignore[no-untyped-def]
    alert, _ = resolver_alert
    netns.ip("link", "set", "lo", "up")
    r = _herdwall("filter", "install", str(manifest_path("resolver")), str(alert),
                  netns=netns.name)
    assert r.returncode == 0, r.stderr
    listed = json.loads(_herdwall("filter", "list", "--json", netns=netns.name).stdout)
    assert len(listed) == 2
    assert _herdwall("filter", "remove", listed[0]["id"], netns=netns.name).returncode == 0
    left = json.loads(_herdwall("filter", "list", "--json", netns=netns.name).stdout)
    assert [f["id"] for f in left] == [listed[1]["id"]]
    bad = _herdwall("filter", "remove", "0000", netns=netns.name)
    assert bad.returncode == 1 and "no installed filter" in bad.stderr


@pytest.mark.netns
def test_cli_filter_install_says_a_tcp_filter_needs_a_node(netns, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exploit, alert = tmp_path / "exploit.bin", tmp_path / "alert.cbor"
    exploit.write_bytes(b"".join(m.data for m in traffic("httpd").exploit()))
    m = str(manifest_path("httpd"))
    assert _herdwall("alert", "detect", m, str(exploit), "-o", str(alert)).returncode == 0
    r = _herdwall("filter", "install", m, str(alert), netns=netns.name)
    assert r.returncode == 0, r.stderr
    assert "(user space)" in r.stdout and "checked by a running node's stack" in r.stdout


@pytest.mark.netns
def test_cli_filter_install_reads_the_alert_once(netns, resolver_alert) -> None:  # type: ignore[no-untyped-def]
    """What is verified is what is installed: the alert is read once, so it can come on
    standard input."""
    alert, _ = resolver_alert
    netns.ip("link", "set", "lo", "up")
    r = _herdwall("filter", "install", str(manifest_path("resolver")), "-", netns=netns.name,
                  stdin=alert.read_bytes())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("installed") == 2
    listed = json.loads(_herdwall("filter", "list", "--json", netns=netns.name).stdout)
    assert len(listed) == 2


def test_cli_filter_install_of_a_missing_service_is_bad_input(resolver_alert) -> None:  # type: ignore[no-untyped-def]
    alert, d = resolver_alert
    r = _herdwall("filter", "install", str(d / "no-such-service.toml"), str(alert))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "ManifestError" not in r.stderr
    assert "no such manifest" in r.stderr
