"""The herdwall CLI, through click's runner and through the installed console script."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from node.cli import main
from node.render import hexdump
from sca.alert import Alert, ByteRef, ExecutionControl, FunctionArgument, Message
from sca.codec import AlertFormatError, alert_id, encode_alert
from sca.envelope import seal
from sca.keys import NodeKey


def example_alert() -> Alert:
    """A fixed, synthetic execution-control alert: one datagram whose bytes 97..104 would
    become a return address. No real service or exploit is involved."""
    payload = b"\x04" + b"A" * 96 + (0xDEADBEEF).to_bytes(8, "little") + b"\x90" * 15
    return Alert(
        service_id=hashlib.sha256(b"herdwall demo: not a real service binary").digest(),
        service_name="demo-resolver",
        messages=(Message(payload),),
        verification=ExecutionControl(target=tuple(ByteRef(0, 97 + i) for i in range(8))),
    )


COMMANDS = ["alert", "filter", "node", "peer", "throttle", "testbed", "monitor", "demo",
            "keygen", "id"]


def run(*args: str, env: dict[str, str] | None = None):  # -> click.testing.Result
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    alert = example_alert()
    data = encode_alert(alert)
    key = NodeKey.from_private_bytes(hashlib.sha256(b"cli test").digest())
    envelope = seal(data, key, 1_700_000_000.5)
    out = {
        "alert": tmp_path / "alert.cbor",
        "envelope": tmp_path / "alert.env",
        "garbage": tmp_path / "garbage.bin",
        "forged": tmp_path / "forged.env",
    }
    out["alert"].write_bytes(data)
    out["envelope"].write_bytes(envelope.encode())
    out["garbage"].write_bytes(b"\xff\x00junk\n\x1b[31m")
    forged = bytearray(envelope.encode())
    forged[forged.index(b"AAAA")] ^= 1
    out["forged"].write_bytes(bytes(forged))
    return out


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.startswith("herdwall ")


def test_help_lists_every_command_with_one_line_each() -> None:
    result = run("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == COMMANDS


GROUPS = [name for name, cmd in main.commands.items() if isinstance(cmd, click.Group)]


@pytest.mark.parametrize("group", GROUPS)
def test_a_group_alone_shows_its_commands(group: str) -> None:
    result = run(group)
    cmds = main.commands[group].commands  # type: ignore[attr-defined]
    if cmds:
        assert result.exit_code == 0
        assert all(c in result.output for c in cmds)
    else:  # a group with nothing yet says so plainly
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, "not available yet")


def test_monitor_says_plainly_when_no_node_runs(tmp_path: Path) -> None:
    result = run("monitor", "--once", "--state-dir", str(tmp_path))
    assert result.exit_code == 3
    assert "No herdwall node is running" in result.output


def test_group_with_commands_shows_help() -> None:
    result = run("alert")
    assert result.exit_code == 0
    assert "show" in result.output


def test_usage_errors_exit_2() -> None:
    assert run("no-such-command").exit_code == 2
    assert run("alert", "show").exit_code == 2


def test_keygen_and_id(tmp_path: Path) -> None:
    result = run("keygen", "--state-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    key = NodeKey.load(tmp_path)
    assert key.node_id.hex() in result.output
    assert (os.stat(tmp_path / "node.key").st_mode & 0o777) == 0o600
    result = run("id", "--state-dir", str(tmp_path))
    assert result.exit_code == 0
    assert key.node_id.hex() in result.output and key.public_bytes.hex() in result.output

    again = run("keygen", "--state-dir", str(tmp_path))
    assert again.exit_code == 1
    assert_one_line_error(again.stderr, "already exists", "--force")
    assert NodeKey.load(tmp_path).node_id == key.node_id
    forced = run("keygen", "--state-dir", str(tmp_path), "--force")
    assert forced.exit_code == 0
    assert NodeKey.load(tmp_path).node_id != key.node_id


def test_id_uses_env_state_dir_and_explains_missing_key(tmp_path: Path) -> None:
    result = run("id", env={"HERDWALL_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "herdwall keygen")
    (tmp_path / "k").mkdir()
    NodeKey.generate().save(tmp_path / "k")
    os.chmod(tmp_path / "k" / "node.key", 0o644)
    result = run("id", "--state-dir", str(tmp_path / "k"))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"chmod 600 {tmp_path / 'k' / 'node.key'}")


def test_alert_show_alert(files: dict[str, Path]) -> None:
    result = run("alert", "show", str(files["alert"]))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "execution-control" in out and "demo-resolver" in out
    assert alert_id(example_alert()).hex() in out
    assert example_alert().service_id.hex() in out
    assert "m0+97..104" in out and "0xdeadbeef" in out
    assert "0060  41 ef be ad de" in out  # the hex dump, target bytes included
    assert "signed by" not in out


def test_alert_show_envelope(files: dict[str, Path]) -> None:
    result = run("alert", "show", str(files["envelope"]))
    assert result.exit_code == 0, result.output
    key = NodeKey.from_private_bytes(hashlib.sha256(b"cli test").digest())
    assert key.node_id.hex() in result.output
    assert "2023-11-14T22:13:20.500Z" in result.output
    assert "good" in result.output


def test_alert_show_json(files: dict[str, Path]) -> None:
    result = run("alert", "show", "--json", str(files["envelope"]))
    assert result.exit_code == 0
    doc = json.loads(result.output)
    alert = example_alert()
    assert doc["kind"] == "envelope"
    assert doc["alert_id"] == alert_id(alert).hex()
    assert doc["type"] == "execution-control"
    assert doc["service_id"] == alert.service_id.hex()
    assert doc["messages"] == [{"connection": None, "data": alert.messages[0].data.hex()}]
    assert doc["info"] == {"target": [[0, 97 + i] for i in range(8)]}
    assert doc["envelope"]["signed_at_ms"] == 1_700_000_000_500
    assert doc["envelope"]["signature_ok"] is True
    plain = json.loads(run("alert", "show", "--json", str(files["alert"])).output)
    assert plain["kind"] == "alert" and "envelope" not in plain


def test_alert_show_reads_stdin(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["alert", "show", "--json", "-"],
                                input=files["alert"].read_bytes())
    assert result.exit_code == 0
    assert json.loads(result.output)["service_name"] == "demo-resolver"


@pytest.mark.parametrize("name,words", [
    ("garbage", ["invalid alert"]),
    ("forged", ["signature does not match"]),
])
def test_alert_show_refuses_bad_files(files: dict[str, Path], name: str,
                                      words: list[str]) -> None:
    result = run("alert", "show", str(files[name]))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, *words)
    assert result.stdout == ""


def test_alert_show_missing_file(tmp_path: Path) -> None:
    result = run("alert", "show", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "No such file", "nope")
    assert "Error:" not in result.stderr and "--debug" not in result.stderr


def test_debug_lets_the_traceback_through(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["--debug", "alert", "show", str(files["garbage"])])
    assert isinstance(result.exception, AlertFormatError)


def test_demo_runs_every_step() -> None:
    # The worm half needs a testbed (tests/node/testbed runs it); this is the walk-through.
    result = run("demo", "--walkthrough")
    assert result.exit_code == 0, result.output
    assert "every step passed" in result.output
    assert "refused (invalid signature" in result.output
    assert "refuted" in result.output  # a benign message dressed up as an alert
    for service in ("resolver", "httpd", "rpcd", "mgmtd"):
        assert service in result.output
    assert "FAIL" not in result.output


def test_hexdump_highlights_exactly_the_referenced_bytes() -> None:
    data = bytes(range(0x41, 0x41 + 40))
    text = hexdump(data, {2, 17}, "bold red")
    marked = [text.plain[s.start:s.end] for s in text.spans if s.style == "bold red"]
    # Each referenced byte is marked twice: its hex and its ASCII character.
    assert marked == ["43", "C", "52", "R"]


def test_hexdump_folds_repeated_lines() -> None:
    text = hexdump(b"A" * 160 + b"B", set(), "bold").plain
    assert text.count("*") == 1 and text.count("|AAAAAAAAAAAAAAAA|") == 1
    assert "00a0  42" in text
    # A repeated line with a highlighted byte is never folded away.
    shown = hexdump(b"A" * 160, {80}, "bold").plain
    assert "0050" in shown


def test_show_function_argument_alert(tmp_path: Path) -> None:
    data = b"GET /cgi?cmd=/bin/sh HTTP/1.0\r\n"
    start = data.index(b"/bin/sh")
    alert = Alert(service_id=bytes(32), service_name="httpd", messages=(Message(data, 0),),
                  verification=FunctionArgument("execve", 0, tuple(
                      ByteRef(0, start + i) for i in range(7))))
    path = tmp_path / "fa.cbor"
    path.write_bytes(encode_alert(alert))
    result = run("alert", "show", str(path))
    assert result.exit_code == 0
    flat = " ".join(result.output.replace("│", " ").split())
    assert 'bytes m0+13..19 arrive in execve argument 0: "/bin/sh"' in flat
    assert "connection 0" in result.output


# --- the installed console script, as a person would run it -----------------------------------


def herdwall(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "herdwall"
    assert script.exists(), "the console script is missing: run bash scripts/setup"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_console_script(tmp_path: Path, files: dict[str, Path]) -> None:
    version = herdwall("--version")
    assert version.returncode == 0 and version.stdout.startswith("herdwall ")

    helped = herdwall("--help")
    assert helped.returncode == 0
    for command in COMMANDS:
        assert f"\n  {command} " in helped.stdout

    env = {"HERDWALL_STATE_DIR": str(tmp_path / "state")}
    made = herdwall("keygen", env=env)
    assert made.returncode == 0, made.stderr
    shown = herdwall("id", env=env)
    assert shown.returncode == 0
    assert NodeKey.load(tmp_path / "state").node_id.hex() in shown.stdout

    show = herdwall("alert", "show", str(files["envelope"]))
    assert show.returncode == 0, show.stderr
    assert "demo-resolver" in show.stdout

    bad = herdwall("alert", "show", str(files["garbage"]))
    assert bad.returncode != 0
    assert_one_line_error(bad.stderr, "invalid alert")
    assert "\x1b[31m" not in bad.stderr or bad.stderr.count("\n") == 1
