"""Config: embedded defaults, every key checked, every error naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from node.daemon.config import (
    DEFAULTS_TOML,
    Config,
    ConfigError,
    load_config,
    parse_addr,
    parse_config,
)


def parse(doc: dict, tmp_path: Path) -> Config:
    return parse_config(doc, base=tmp_path, source=tmp_path / "node.toml")


def test_no_file_gives_working_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERDWALL_CONFIG", raising=False)
    monkeypatch.setenv("HERDWALL_STATE_DIR", str(tmp_path / "st"))
    cfg = load_config(None)
    assert cfg.source is None
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.services.manifests == ()  # the vulnerable samples are never protected unasked
    assert cfg.detector.enabled is False
    assert cfg.metrics.listen is None
    assert cfg.kernel.fail_open is True
    assert cfg.store_path == tmp_path / "st" / "herdwall.db"
    assert cfg.socket_path == tmp_path / "st" / "control.sock"
    assert cfg.events.log == tmp_path / "st" / "events.jsonl"


def test_commented_defaults_are_the_defaults(tmp_path: Path) -> None:
    doc = tomllib.loads(DEFAULTS_TOML)
    from_text = parse(doc, tmp_path)
    built_in = parse({}, tmp_path)
    a, b = from_text.to_json(), built_in.to_json()
    for d in (a, b):
        d.pop("source")
    assert a["state_dir"] and a == b


def test_a_full_config(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    cfg = parse({
        "state_dir": "st",
        "services": {"manifests": ["svc/service.toml"]},
        "detector": {"enabled": True, "workers": 2, "queue_size": 10, "job_timeout_s": 2},
        "overlay": {"bind": "[::1]:7400", "bootstrap": ["10.77.0.1:7400", "node.example:1"]},
        "throttle": {"allowlist": ["10.77.0.0/24", "10.77.1.1"], "quarantine_infected": True},
        "metrics": {"listen": "127.0.0.1:9477"},
        "events": {"log": "off"},
        "control": {"socket": "/run/hw.sock"},
    }, tmp_path)
    assert cfg.state_dir == (tmp_path / "st").resolve()
    assert cfg.services.manifests == ((tmp_path / "svc" / "service.toml").resolve(),)
    assert cfg.detector.workers == 2 and cfg.detector.job_timeout_s == 2.0
    assert cfg.overlay.bind == ("::1", 7400)
    assert cfg.overlay.bootstrap == (("10.77.0.1", 7400), ("node.example", 1))
    assert cfg.throttle.allowlist == ("10.77.0.0/24", "10.77.1.1/32")
    assert cfg.metrics.listen == ("127.0.0.1", 9477)
    assert cfg.events.log is None
    assert cfg.socket_path == Path("/run/hw.sock")
    assert cfg.to_json()["overlay"]["bootstrap"] == ["10.77.0.1:7400", "node.example:1"]


def test_the_event_log_keeps_its_rotation_settings(tmp_path: Path) -> None:
    for events in ({"log_max_bytes": 0, "log_backups": 1},
                   {"log": "ev.jsonl", "log_max_bytes": 300, "log_backups": 2, "keep": 7}):
        cfg = parse({"state_dir": "st", "events": events}, tmp_path)
        want = {k: v for k, v in events.items() if k != "log"}
        assert {k: getattr(cfg.events, k) for k in want} == want
        assert cfg.events.log == tmp_path / events.get("log", "st/events.jsonl")


def test_command_line_state_dir_wins(tmp_path: Path) -> None:
    cfg = parse_config({"state_dir": "/elsewhere"}, base=tmp_path, state_dir=tmp_path / "cli")
    assert cfg.state_dir == tmp_path / "cli"


BAD = [
    ({"detectr": {}}, "detectr: unknown section"),
    ({"verbose": True}, "verbose: unknown key"),
    ({"detector": {"enable": True}}, "detector.enable: unknown key"),
    ({"detector": {"enabled": "yes"}}, "detector.enabled: must be true or false"),
    ({"detector": {"workers": 0}}, "detector.workers: must be an integer from 1"),
    ({"detector": {"workers": True}}, "detector.workers: must be an integer"),
    ({"detector": {"queue_size": 1.5}}, "detector.queue_size: must be an integer"),
    ({"detector": {"job_timeout_s": 0}}, "detector.job_timeout_s: must be a number more than"),
    ({"detector": {"job_timeout_s": float("nan")}}, "detector.job_timeout_s"),
    ({"detector": 3}, "detector: must be a table"),
    ({"verifier": {"workers": 100}}, "verifier.workers"),
    ({"filters": {"expire_after_s": -1}}, "filters.expire_after_s"),
    ({"filters": {"general_delay_ms": -5}}, "filters.general_delay_ms"),
    ({"filters": {"general_delay_ms": "soon"}}, "filters.general_delay_ms"),
    ({"overlay": {"serve_first_ms": -1}}, "overlay.serve_first_ms"),
    ({"overlay": {"serve_first_ms": 5000}}, "overlay.serve_first_ms"),
    ({"services": {"manifests": "a.toml"}}, "services.manifests: must be an array"),
    ({"services": {"manifests": [1]}}, "services.manifests: [0] must be a path"),
    ({"services": {"manifests": ["ok.toml", ""]}}, "services.manifests: [1] must not be empty"),
    ({"overlay": {"bind": "7400"}}, "overlay.bind: must be host:port"),
    ({"overlay": {"bind": "0.0.0.0:99999"}}, "overlay.bind: port out of range"),
    ({"overlay": {"bootstrap": ["10.77.0.1:0"]}}, "overlay.bootstrap: [0] port out of range"),
    ({"overlay": {"bootstrap": ["a:1", "fe80::1:7400"]}}, "overlay.bootstrap: [1] write an IPv6"),
    ({"overlay": {"bootstrap": ["[nothex]:1"]}}, "overlay.bootstrap: [0] 'nothex' is not an IPv6"),
    ({"overlay": {"bootstrap": [["a", 1]]}}, "overlay.bootstrap: [0] must be a \"host:port\""),
    ({"kernel": {"queue_max_len": -1}}, "kernel.queue_max_len"),
    ({"throttle": {"release_rate": 0}}, "throttle.release_rate"),
    ({"throttle": {"allowlist": ["10.77.0.0/33"]}}, "throttle.allowlist: [0] '10.77.0.0/33'"),
    ({"throttle": {"threshold": "100"}}, "throttle.threshold"),
    ({"metrics": {"listen": "localhost"}}, "metrics.listen: must be host:port"),
    ({"events": {"keep": -5}}, "events.keep"),
    ({"events": {"log": 5}}, "events.log: must be a path"),
    ({"control": {"socket": ["x"]}}, "control.socket: must be a path"),
    ({"state_dir": 1}, "state_dir: must be a path"),
]


@pytest.mark.parametrize(("doc", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_each_bad_key_is_named(doc: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(doc, tmp_path)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'node.toml'}: ")


def test_every_error_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"detector": {"workers": 0, "bogus": 1}, "kernel": {"enabled": 1}}, tmp_path)
    text = str(e.value)
    assert "detector.workers" in text and "detector.bogus" in text and "kernel.enabled" in text


@pytest.mark.parametrize(("content", "message"), [
    (b"[detector\nenabled = true", "not valid TOML"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"a" * (1 << 20 + 1), "larger than"),
])
def test_bad_files(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[detector]\nenabled = true\n')
    monkeypatch.setenv("HERDWALL_CONFIG", str(path))
    assert load_config().detector.enabled is True


@pytest.mark.parametrize(("text", "want"), [
    ("10.77.0.1:7400", ("10.77.0.1", 7400)),
    ("[fe80::1]:1", ("fe80::1", 1)),
    ("host.example:65535", ("host.example", 65535)),
])
def test_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_addr(text, allow_zero_port=False) == want


def test_node_config_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    herdwall = str(Path(sys.executable).parent / "herdwall")
    bad = tmp_path / "bad.toml"
    bad.write_text("[detector]\nqueue_size = 0\n")
    r = subprocess.run([herdwall, "node", "config", "--check", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "detector.queue_size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([herdwall, "node", "config", "--defaults"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == DEFAULTS_TOML
    # What the node would refuse at its start, the check refuses too: a missing manifest, two
    # services on one port.
    from sca.services import manifest_path

    twice = str(manifest_path("resolver"))
    for manifests, message in ((["/nonexistent/service.toml"], "services.manifests[0]"),
                               ([twice, twice], "clashes with")):
        cfg = tmp_path / "svc.toml"
        cfg.write_text(f"[services]\nmanifests = {manifests!r}\n".replace("'", '"'))
        r = subprocess.run([herdwall, "node", "config", "--check", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
