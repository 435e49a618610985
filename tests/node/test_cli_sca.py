"""``herdwall alert detect`` / ``alert verify`` through the installed console script."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sca.codec import decode_alert
from sca.services import manifest_path, traffic

HERDWALL = shutil.which("herdwall") or str(Path(sys.executable).with_name("herdwall"))


def herdwall(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HERDWALL, *map(str, args)], capture_output=True, text=True, timeout=120)


def write_messages(tmp: Path, name: str, messages) -> list[str]:  # type: ignore[no-untyped-def]
    specs = []
    for i, m in enumerate(messages):
        p = tmp / f"{name}-{i}.bin"
        p.write_bytes(m.data)
        specs.append(str(p) if m.connection is None else f"{p}@{m.connection}")
    return specs


@pytest.mark.parametrize("service", ["resolver", "rpcd", "mgmtd"])
def test_detect_writes_an_alert_that_verifies(tmp_path: Path, service: str) -> None:
    t = traffic(service)
    specs = write_messages(tmp_path, service, t.exploit(random.Random(3)))
    out = tmp_path / "alert.cbor"
    r = herdwall("alert", "detect", manifest_path(service), *specs, "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exploit detected" in r.stdout
    alert = decode_alert(out.read_bytes())
    assert alert.type == t.EXPECTED_TYPE
    v = herdwall("alert", "verify", manifest_path(service), out)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "verified" in v.stdout


def test_detect_benign_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    specs = write_messages(tmp_path, "httpd", traffic("httpd").benign(random.Random(2)))
    out = tmp_path / "alert.cbor"
    r = herdwall("alert", "detect", manifest_path("httpd"), *specs, "-o", out)
    assert r.returncode == 1
    assert "no exploit detected" in r.stdout
    assert not out.exists()


def test_verify_refutes_alert_for_another_service(tmp_path: Path) -> None:
    specs = write_messages(tmp_path, "resolver", traffic("resolver").exploit())
    out = tmp_path / "alert.cbor"
    assert herdwall("alert", "detect", manifest_path("resolver"), *specs, "-o", out).returncode == 0
    r = herdwall("alert", "verify", manifest_path("httpd"), out)
    assert r.returncode == 1
    assert "unknown-service" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("alert", "detect", "/nonexistent/service.toml", "x"),
        ("alert", "detect", str(manifest_path("httpd")), "/nonexistent/message"),
        ("alert", "detect", str(manifest_path("resolver")), "somefile@0"),
        ("alert", "detect", str(manifest_path("resolver")), "-", "-"),
        ("alert", "verify", str(manifest_path("httpd")), str(manifest_path("httpd"))),
    ],
)
def test_bad_input_exits_2_with_one_line(args: tuple[str, ...]) -> None:
    r = herdwall(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "[Errno" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_where_the_alert_goes_is_checked_before_the_replay(tmp_path: Path) -> None:
    specs = write_messages(tmp_path, "resolver", traffic("resolver").exploit())
    m = manifest_path("resolver")
    cases = [
        (("-o", tmp_path / "no-such-folder" / "a.cbor"), "no folder"),
        (("-o", tmp_path / "a.cbor", "--sign", "--state-dir", tmp_path / "nokey"), "no node key"),
        (("--sign",), "give -o"),
    ]
    for extra, message in cases:
        r = herdwall("alert", "detect", m, *specs, *extra)
        assert r.returncode == 2, r.stdout + r.stderr
        assert message in r.stderr and "replayed" not in r.stdout, r.stdout + r.stderr
    assert list(tmp_path.glob("*.cbor")) == []


def test_a_failed_write_keeps_the_old_alert_and_leaves_no_temporary(tmp_path: Path) -> None:
    import resource
    import signal

    def limit() -> None:  # files past 100 bytes cannot be written (as on a full disk)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    specs = write_messages(tmp_path, "resolver", traffic("resolver").exploit())
    out = tmp_path / "out" / "alert.cbor"
    out.parent.mkdir()
    out.write_bytes(b"the old alert")
    r = subprocess.run([HERDWALL, "alert", "detect", str(manifest_path("resolver")), *specs,
                        "-o", str(out)], capture_output=True, text=True, timeout=120,
                       preexec_fn=limit)
    assert r.returncode == 2 and "exploit detected" in r.stdout, r.stdout + r.stderr
    assert f"cannot write {out}" in r.stderr and ".tmp" not in r.stderr
    assert out.read_bytes() == b"the old alert"
    assert [p.name for p in out.parent.iterdir()] == ["alert.cbor"]
