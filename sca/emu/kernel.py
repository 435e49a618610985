"""The emulated Linux kernel the sandboxed service talks to.

It carries out the syscalls small static servers make, with emulated sockets: receives are fed the
run's input messages in order, sends are captured, and when the service would block with nothing
left to read the run stops there. Process creation, execve and file opens are never carried out:
they are recorded (execve is what function-argument alerts watch) and fail.

The state here is plain Python so the sandbox can copy it at the snapshot and restore it with the
emulator's own context on every run.
"""

from __future__ import annotations

import copy
import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unicorn import Uc, UcError
from unicorn.x86_const import UC_X86_REG_FS_BASE, UC_X86_REG_GS_BASE

from sca.alert import Message

# Syscall numbers (x86-64).
READ = 0
WRITE = 1
OPEN = 2
CLOSE = 3
FSTAT = 5
POLL = 7
MMAP = 9
MPROTECT = 10
MUNMAP = 11
BRK = 12
RT_SIGACTION = 13
RT_SIGPROCMASK = 14
IOCTL = 16
READV = 19
WRITEV = 20
SELECT = 23
SCHED_YIELD = 24
MREMAP = 25
MADVISE = 28
DUP = 32
DUP2 = 33
NANOSLEEP = 35
GETPID = 39
SOCKET = 41
CONNECT = 42
ACCEPT = 43
SENDTO = 44
RECVFROM = 45
SENDMSG = 46
RECVMSG = 47
SHUTDOWN = 48
BIND = 49
LISTEN = 50
GETSOCKNAME = 51
GETPEERNAME = 52
SETSOCKOPT = 54
GETSOCKOPT = 55
CLONE = 56
FORK = 57
VFORK = 58
EXECVE = 59
EXIT = 60
WAIT4 = 61
KILL = 62
UNAME = 63
FCNTL = 72
READLINK = 89
GETTIMEOFDAY = 96
GETUID = 102
GETGID = 104
GETEUID = 107
GETEGID = 108
SIGALTSTACK = 131
ARCH_PRCTL = 158
GETTID = 186
TIME = 201
FUTEX = 202
SET_TID_ADDRESS = 218
CLOCK_GETTIME = 228
EXIT_GROUP = 231
TGKILL = 234
OPENAT = 257
NEWFSTATAT = 262
PSELECT6 = 270
PPOLL = 271
SET_ROBUST_LIST = 273
ACCEPT4 = 288
PRLIMIT64 = 302
GETRANDOM = 318
STATX = 332
EXECVEAT = 322
RSEQ = 334
CLONE3 = 435
OPENAT2 = 437
CREAT = 85

RECORDED_FAILURES = {
    CLONE: ("clone", errno.EAGAIN),
    FORK: ("fork", errno.EAGAIN),
    VFORK: ("vfork", errno.EAGAIN),
    CLONE3: ("clone3", errno.EAGAIN),
    OPEN: ("open", errno.EACCES),
    OPENAT: ("openat", errno.EACCES),
    OPENAT2: ("openat2", errno.EACCES),
    CREAT: ("creat", errno.EACCES),
    EXECVEAT: ("execveat", errno.EACCES),
    KILL: ("kill", errno.EPERM),
    TGKILL: ("tgkill", errno.EPERM),
}

AF_INET, SOCK_STREAM, SOCK_DGRAM = 2, 1, 2
MAX_IO = 1 << 20
MAX_STRING = 4096
MAX_ARGV = 256
MAX_FDS = 256
MAX_CONSOLE = 64 * 1024
MAX_SENDS = 4096
MAX_SENT_BYTES = 1 << 20
# Every emulated client is 10.77.255.1:40000 (0x409C is 40000 in network order as read LE).
# A testbed address; nothing is ever sent to it.
PEER_SOCKADDR = struct.pack("<HH4s8x", AF_INET, 0x409C, bytes([10, 77, 255, 1]))


class Blocked(Exception):
    """The service waits for input that the run does not have."""


class Exited(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class TrapHit(Exception):
    """A verifier trap raised from inside a syscall."""


@dataclass
class Socket:
    kind: int  # SOCK_STREAM or SOCK_DGRAM
    port: int = 0
    listening: bool = False
    connection: int | None = None  # for an accepted stream: the connection number
    pending: bytes = b""  # the unread rest of the current chunk
    pending_msg: int = -1
    pending_off: int = 0
    eof: bool = False


@dataclass
class SyscallRecord:
    name: str
    args: tuple[Any, ...] = ()


@dataclass
class KernelState:
    """What the snapshot must carry besides the emulator's own context."""

    fds: dict[int, Socket | str] = field(default_factory=lambda: {0: "tty", 1: "tty", 2: "tty"})
    brk: int = 0
    brk_base: int = 0
    brk_limit: int = 0
    mmap_next: int = 0
    mmap_limit: int = 0
    clock_ns: int = 1_700_000_000 * 10**9
    rand_counter: int = 0

    def clone(self) -> KernelState:
        # By hand: deepcopy costs tens of microseconds on every flash clone.
        new = copy.copy(self)
        new.fds = {fd: copy.copy(obj) for fd, obj in self.fds.items()}
        return new


@dataclass
class Io:
    """Per-run input and output: the messages to feed and what came back."""

    messages: tuple[Message, ...] = ()
    next_msg: int = 0  # for datagrams: the next message to deliver
    accepted: list[int] = field(default_factory=list)  # connection numbers in accept order
    chunk_cursor: dict[int, int] = field(default_factory=dict)  # connection -> next message idx
    sent: list[tuple[int | None, bytes]] = field(default_factory=list)
    sent_bytes: int = 0
    console: bytearray = field(default_factory=bytearray)
    records: list[SyscallRecord] = field(default_factory=list)

    def connections(self) -> list[int]:
        seen: list[int] = []
        for m in self.messages:
            if m.connection is not None and m.connection not in seen:
                seen.append(m.connection)
        return seen

    def next_chunk(self, conn: int) -> int | None:
        start = self.chunk_cursor.get(conn, 0)
        for i in range(start, len(self.messages)):
            if self.messages[i].connection == conn:
                self.chunk_cursor[conn] = i + 1
                return i
        self.chunk_cursor[conn] = len(self.messages)
        return None

    def has_chunk(self, conn: int) -> bool:
        start = self.chunk_cursor.get(conn, 0)
        return any(m.connection == conn for m in self.messages[start:])

    def pending_connection(self) -> int | None:
        for c in self.connections():
            if c not in self.accepted:
                return c
        return None

    def next_datagram(self) -> int | None:
        while self.next_msg < len(self.messages):
            i = self.next_msg
            self.next_msg += 1
            if self.messages[i].connection is None:
                return i
        return None

    def has_datagram(self) -> bool:
        return any(m.connection is None for m in self.messages[self.next_msg:])


# Called with (address, message index, offset in message, length) when input lands in memory,
# and with (address, length) for every other write the kernel makes into service memory.
InputHook = Callable[[int, int, int, int], None]
WriteHook = Callable[[int, int], None]
# Called with (path address, [argv string addresses]) before execve is refused; may raise to stop.
ExecveHook = Callable[[int, list[int]], None]


def _neg(e: int) -> int:
    return -e


class Kernel:
    def __init__(self, uc: Uc, state: KernelState) -> None:
        self.uc = uc
        self.state = state
        self.io = Io()
        self.on_input: InputHook | None = None
        self.on_write: WriteHook | None = None
        self.on_execve: ExecveHook | None = None
        self.trap_number: int | None = None  # a syscall number that means "verifier trap hit"
        self.trap_hit: int | None = None

    # -- memory helpers -------------------------------------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.uc.mem_read(addr, n))

    def write(self, addr: int, data: bytes) -> None:
        self.uc.mem_write(addr, data)
        if self.on_write is not None:
            self.on_write(addr, len(data))

    def cstring(self, addr: int, limit: int = MAX_STRING) -> bytes:
        out = bytearray()
        while len(out) < limit:
            at = addr + len(out)
            # Never read across a page in one go: the string may end just before unmapped memory.
            chunk = self.read(at, min(256, limit - len(out), 0x1000 - at % 0x1000))
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
        return bytes(out)

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    # -- dispatch -------------------------------------------------------------------------------
    def syscall(self, nr: int, a: tuple[int, int, int, int, int, int]) -> int:
        """Carry out one syscall; return the value for rax (negative errno on failure).

        Raises Blocked when the service must wait, Exited on exit, TrapHit for a verifier trap."""
        if self.trap_number is not None and nr == self.trap_number:
            self.trap_hit = nr
            raise TrapHit()
        handler = _HANDLERS.get(nr)
        if handler is not None:
            try:
                return handler(self, *a)
            except UcError:
                return _neg(errno.EFAULT)
        if nr in RECORDED_FAILURES:
            name, err = RECORDED_FAILURES[nr]
            self.record(name, a[0])
            return _neg(err)
        self.record("unknown", nr)
        return _neg(errno.ENOSYS)

    def record(self, name: str, *args: Any) -> None:
        if len(self.io.records) < 1024:
            self.io.records.append(SyscallRecord(name, args))

    def sock(self, fd: int) -> Socket | None:
        s = self.state.fds.get(fd)
        return s if isinstance(s, Socket) else None

    def new_fd(self, obj: Socket | str) -> int:
        for fd in range(3, MAX_FDS):
            if fd not in self.state.fds:
                self.state.fds[fd] = obj
                return fd
        return _neg(errno.EMFILE)

    # -- sockets --------------------------------------------------------------------------------
    def sys_socket(self, family: int, kind: int, proto: int, *_: int) -> int:
        kind &= 0xF  # strip SOCK_NONBLOCK / SOCK_CLOEXEC
        if family != AF_INET or kind not in (SOCK_STREAM, SOCK_DGRAM):
            return _neg(errno.EAFNOSUPPORT)
        return self.new_fd(Socket(kind))

    def sys_bind(self, fd: int, addr: int, alen: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None:
            return _neg(errno.ENOTSOCK)
        if alen >= 4:
            s.port = struct.unpack(">H", self.read(addr + 2, 2))[0]
        return 0

    def sys_listen(self, fd: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None or s.kind != SOCK_STREAM:
            return _neg(errno.EOPNOTSUPP)
        s.listening = True
        return 0

    def _write_peer(self, addr: int, lenp: int) -> None:
        if addr and lenp:
            sin = PEER_SOCKADDR
            room = struct.unpack("<I", self.read(lenp, 4))[0]
            self.write(addr, sin[: min(room, len(sin))])
            self.write(lenp, struct.pack("<I", len(sin)))

    def sys_accept(self, fd: int, addr: int, lenp: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None or not s.listening:
            return _neg(errno.EINVAL)
        conn = self.io.pending_connection()
        if conn is None:
            raise Blocked()
        self.io.accepted.append(conn)
        nfd = self.new_fd(Socket(SOCK_STREAM, port=s.port, connection=conn))
        if nfd >= 0:
            self._write_peer(addr, lenp)
        return nfd

    def _fill(self, s: Socket) -> bool:
        """Make sure the socket has unread bytes; False at end of stream."""
        if s.pending:
            return True
        if s.connection is not None:
            i = self.io.next_chunk(s.connection)
            if i is None:
                # The client said everything; if other work is queued it has closed its side,
                # otherwise the service would wait for more.
                if self.io.pending_connection() is None and not self.io.has_datagram():
                    raise Blocked()
                s.eof = True
                return False
        else:
            i = self.io.next_datagram()
            if i is None:
                raise Blocked()
        s.pending, s.pending_msg, s.pending_off = self.io.messages[i].data, i, 0
        return True

    def _receive(self, s: Socket, buf: int, n: int) -> int:
        n = max(0, min(n, MAX_IO))
        if not self._fill(s):
            return 0
        take = s.pending[:n]
        self.write(buf, take)
        if self.on_input is not None and take:
            self.on_input(buf, s.pending_msg, s.pending_off, len(take))
        if s.kind == SOCK_DGRAM:
            s.pending = b""  # the rest of a datagram is lost, as on Linux
        else:
            s.pending = s.pending[len(take):]
            s.pending_off += len(take)
        return len(take)

    def sys_recvfrom(self, fd: int, buf: int, n: int, flags: int, addr: int, lenp: int) -> int:
        s = self.sock(fd)
        if s is None:
            return _neg(errno.ENOTSOCK)
        if s.listening:
            return _neg(errno.ENOTCONN)
        got = self._receive(s, buf, n)
        if s.kind == SOCK_DGRAM:
            self._write_peer(addr, lenp)
        return got

    def sys_recvmsg(self, fd: int, msg: int, flags: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None:
            return _neg(errno.ENOTSOCK)
        name, namelen, iov, iovlen = struct.unpack("<QI4xQQ", self.read(msg, 32))
        if iovlen < 1:
            return _neg(errno.EINVAL)
        base, length = struct.unpack("<QQ", self.read(iov, 16))
        got = self._receive(s, base, length)
        if name and namelen >= 16 and s.kind == SOCK_DGRAM:
            self.write(name, PEER_SOCKADDR)
        return got

    def _send(self, fd: int, data: bytes) -> int:
        obj = self.state.fds.get(fd)
        if obj is None:
            return _neg(errno.EBADF)
        if obj == "tty":
            room = MAX_CONSOLE - len(self.io.console)
            self.io.console += data[: max(0, room)]
            return len(data)
        assert isinstance(obj, Socket)
        # Keep what the service sent, within bounds: a hostile input may make it send forever.
        if len(self.io.sent) < MAX_SENDS and self.io.sent_bytes + len(data) <= MAX_SENT_BYTES:
            self.io.sent.append((obj.connection, data))
            self.io.sent_bytes += len(data)
        return len(data)

    def sys_sendto(self, fd: int, buf: int, n: int, *_: int) -> int:
        n = max(0, min(n, MAX_IO))
        return self._send(fd, self.read(buf, n))

    def sys_sendmsg(self, fd: int, msg: int, *_: int) -> int:
        _, _, iov, iovlen = struct.unpack("<QI4xQQ", self.read(msg, 32))
        return self._send(fd, self._gather(iov, iovlen))

    def _gather(self, iov: int, count: int) -> bytes:
        out = bytearray()
        for i in range(min(count, 64)):
            base, length = struct.unpack("<QQ", self.read(iov + 16 * i, 16))
            out += self.read(base, min(length, MAX_IO - len(out)))
        return bytes(out)

    def sys_read(self, fd: int, buf: int, n: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None:
            return 0 if self.state.fds.get(fd) == "tty" else _neg(errno.EBADF)
        return self._receive(s, buf, n)

    def sys_write(self, fd: int, buf: int, n: int, *_: int) -> int:
        n = max(0, min(n, MAX_IO))
        return self._send(fd, self.read(buf, n))

    def sys_writev(self, fd: int, iov: int, count: int, *_: int) -> int:
        return self._send(fd, self._gather(iov, count))

    def sys_close(self, fd: int, *_: int) -> int:
        if fd not in self.state.fds:
            return _neg(errno.EBADF)
        del self.state.fds[fd]
        return 0

    def sys_shutdown(self, fd: int, *_: int) -> int:
        return 0 if self.sock(fd) is not None else _neg(errno.ENOTSOCK)

    def _readable(self, fd: int) -> bool:
        s = self.sock(fd)
        if s is None:
            return fd in self.state.fds
        if s.listening:
            return self.io.pending_connection() is not None
        if s.pending or s.eof:
            return True
        if s.connection is not None:
            return self.io.has_chunk(s.connection) or self.io.pending_connection() is not None
        return self.io.has_datagram()

    def sys_poll(self, fds: int, nfds: int, *_: int) -> int:
        nfds = min(nfds, MAX_FDS)
        ready = 0
        entries = []
        for i in range(nfds):
            fd, events = struct.unpack("<ih", self.read(fds + 8 * i, 6))
            revents = 0
            if fd >= 0:
                if events & 1 and self._readable(fd):
                    revents |= 1
                if events & 4 and fd in self.state.fds:
                    revents |= 4
            entries.append((i, revents))
            ready += bool(revents)
        if ready == 0:
            raise Blocked()
        for i, revents in entries:
            self.write(fds + 8 * i + 6, struct.pack("<h", revents))
        return ready

    def sys_select(self, nfds: int, rset: int, wset: int, *_: int) -> int:
        nfds = max(0, min(nfds, 1024))
        nbytes = (nfds + 7) // 8
        ready = 0
        rbits = bytearray(self.read(rset, nbytes)) if rset else bytearray()
        wbits = bytearray(self.read(wset, nbytes)) if wset else bytearray()
        for fd in range(nfds):
            byte, bit = divmod(fd, 8)
            if rbits and rbits[byte] >> bit & 1:
                if self._readable(fd):
                    ready += 1
                else:
                    rbits[byte] &= ~(1 << bit)
            if wbits and wbits[byte] >> bit & 1:
                ready += 1
        if ready == 0:
            raise Blocked()
        if rset:
            self.write(rset, bytes(rbits))
        return ready

    def sys_pselect6(self, nfds: int, rset: int, wset: int, *_: int) -> int:
        return self.sys_select(nfds, rset, wset)

    # -- process --------------------------------------------------------------------------------
    def sys_exit(self, status: int, *_: int) -> int:
        raise Exited(status & 0xFF)

    def sys_execve(self, path: int, argv: int, envp: int, *_: int) -> int:
        args: list[int] = []
        for i in range(MAX_ARGV):
            p = self.u64(argv + 8 * i) if argv else 0
            if p == 0:
                break
            args.append(p)
        self.record("execve", self.cstring(path), tuple(self.cstring(p) for p in args))
        if self.on_execve is not None:
            self.on_execve(path, args)
        return _neg(errno.EACCES)

    def sys_brk(self, addr: int, *_: int) -> int:
        st = self.state
        if st.brk_base <= addr <= st.brk_limit:
            st.brk = addr
        return st.brk

    def sys_mmap(self, addr: int, length: int, prot: int, flags: int, fd: int, off: int) -> int:
        map_anonymous = 0x20
        if not flags & map_anonymous:
            self.record("mmap-file", fd)
            return _neg(errno.EACCES)
        length = (length + 0xFFF) & ~0xFFF
        st = self.state
        if length <= 0 or st.mmap_next + length > st.mmap_limit:
            return _neg(errno.ENOMEM)
        start = st.mmap_next
        st.mmap_next += length
        # The arena was mapped before the snapshot; a fresh mapping must read as zeros.
        self.uc.mem_write(start, bytes(length))
        if self.on_write is not None:
            self.on_write(start, length)
        return start

    def sys_ok(self, *_: int) -> int:
        return 0

    def sys_mremap(self, *_: int) -> int:
        return _neg(errno.ENOMEM)

    def sys_nosys(self, *_: int) -> int:
        # Known and harmless to refuse: glibc falls back (rseq off, statx -> fstat).
        return _neg(errno.ENOSYS)

    def sys_arch_prctl(self, code: int, addr: int, *_: int) -> int:
        if code == 0x1002:  # ARCH_SET_FS
            self.uc.reg_write(UC_X86_REG_FS_BASE, addr)
            return 0
        if code == 0x1001:  # ARCH_SET_GS
            self.uc.reg_write(UC_X86_REG_GS_BASE, addr)
            return 0
        return _neg(errno.EINVAL)

    def sys_getpid(self, *_: int) -> int:
        return 4242

    def sys_getuid(self, *_: int) -> int:
        return 1000

    def sys_uname(self, buf: int, *_: int) -> int:
        fields = (b"Linux", b"herdwall-sandbox", b"6.1.0", b"#1 SMP", b"x86_64", b"(none)")
        self.write(buf, b"".join(f.ljust(65, b"\0") for f in fields))
        return 0

    def sys_readlink(self, path: int, buf: int, n: int, *_: int) -> int:
        if self.cstring(path) != b"/proc/self/exe":
            self.record("readlink", self.cstring(path))
            return _neg(errno.ENOENT)
        target = b"/srv/service"
        self.write(buf, target[: max(0, n)])
        return min(len(target), max(0, n))

    def sys_clock_gettime(self, clk: int, ts: int, *_: int) -> int:
        self.state.clock_ns += 1000
        sec, ns = divmod(self.state.clock_ns, 10**9)
        self.write(ts, struct.pack("<qq", sec, ns))
        return 0

    def sys_gettimeofday(self, tv: int, *_: int) -> int:
        self.state.clock_ns += 1000
        sec, ns = divmod(self.state.clock_ns, 10**9)
        if tv:
            self.write(tv, struct.pack("<qq", sec, ns // 1000))
        return 0

    def sys_time(self, tloc: int, *_: int) -> int:
        sec = self.state.clock_ns // 10**9
        if tloc:
            self.write(tloc, struct.pack("<q", sec))
        return sec

    def sys_getrandom(self, buf: int, n: int, *_: int) -> int:
        # Deterministic, so two sandboxes replaying the same alert behave the same.
        n = max(0, min(n, 256))
        out = bytearray()
        while len(out) < n:
            self.state.rand_counter += 1
            out += struct.pack("<Q", (self.state.rand_counter * 0x9E3779B97F4A7C15) & (2**64 - 1))
        self.write(buf, bytes(out[:n]))
        return n

    def sys_fstat(self, fd: int, buf: int, *_: int) -> int:
        if fd not in self.state.fds:
            return _neg(errno.EBADF)
        mode = 0o20620 if self.state.fds[fd] == "tty" else 0o140777  # char device / socket
        st = bytearray(144)
        struct.pack_into("<I", st, 24, mode)
        struct.pack_into("<q", st, 56, 4096)  # st_blksize
        self.write(buf, bytes(st))
        return 0

    def sys_newfstatat(self, dirfd: int, path: int, buf: int, flags: int, *_: int) -> int:
        at_empty_path = 0x1000
        if flags & at_empty_path:
            return self.sys_fstat(dirfd, buf)
        self.record("stat", self.cstring(path))
        return _neg(errno.ENOENT)

    def sys_ioctl(self, fd: int, *_: int) -> int:
        return _neg(errno.ENOTTY) if fd in self.state.fds else _neg(errno.EBADF)

    def sys_fcntl(self, fd: int, *_: int) -> int:
        return 0 if fd in self.state.fds else _neg(errno.EBADF)

    def sys_prlimit64(self, pid: int, res: int, new: int, old: int, *_: int) -> int:
        if old:
            self.write(old, struct.pack("<QQ", 8 << 20, 2**64 - 1))
        return 0

    def sys_sockname(self, fd: int, addr: int, lenp: int, *_: int) -> int:
        s = self.sock(fd)
        if s is None:
            return _neg(errno.ENOTSOCK)
        self._write_peer(addr, lenp)
        return 0

    def sys_getsockopt(self, fd: int, level: int, opt: int, val: int, lenp: int, *_: int) -> int:
        if val and lenp:
            self.write(val, bytes(4))
            self.write(lenp, struct.pack("<I", 4))
        return 0

    def sys_dup(self, fd: int, *_: int) -> int:
        obj = self.state.fds.get(fd)
        return _neg(errno.EBADF) if obj is None else self.new_fd(copy.copy(obj))

    def sys_dup2(self, fd: int, new: int, *_: int) -> int:
        obj = self.state.fds.get(fd)
        if obj is None or not 0 <= new < MAX_FDS:
            return _neg(errno.EBADF)
        self.state.fds[new] = obj
        return new

    def sys_wait4(self, *_: int) -> int:
        return _neg(errno.ECHILD)

    def sys_connect(self, *_: int) -> int:
        self.record("connect")
        return _neg(errno.ENETUNREACH)


_K = Kernel
_HANDLERS: dict[int, Callable[..., int]] = {
    READ: _K.sys_read, WRITE: _K.sys_write, CLOSE: _K.sys_close, FSTAT: _K.sys_fstat,
    POLL: _K.sys_poll, PPOLL: _K.sys_poll, MMAP: _K.sys_mmap, MPROTECT: _K.sys_ok,
    MUNMAP: _K.sys_ok, BRK: _K.sys_brk, RT_SIGACTION: _K.sys_ok, RT_SIGPROCMASK: _K.sys_ok,
    IOCTL: _K.sys_ioctl, WRITEV: _K.sys_writev, SELECT: _K.sys_select, PSELECT6: _K.sys_pselect6,
    SCHED_YIELD: _K.sys_ok, MREMAP: _K.sys_mremap, MADVISE: _K.sys_ok, DUP: _K.sys_dup,
    DUP2: _K.sys_dup2, NANOSLEEP: _K.sys_ok, GETPID: _K.sys_getpid, SOCKET: _K.sys_socket,
    CONNECT: _K.sys_connect, ACCEPT: _K.sys_accept, ACCEPT4: _K.sys_accept,
    SENDTO: _K.sys_sendto, RECVFROM: _K.sys_recvfrom, SENDMSG: _K.sys_sendmsg,
    RECVMSG: _K.sys_recvmsg, SHUTDOWN: _K.sys_shutdown, BIND: _K.sys_bind,
    LISTEN: _K.sys_listen, GETSOCKNAME: _K.sys_sockname, GETPEERNAME: _K.sys_sockname,
    SETSOCKOPT: _K.sys_ok, GETSOCKOPT: _K.sys_getsockopt, EXECVE: _K.sys_execve,
    EXIT: _K.sys_exit, EXIT_GROUP: _K.sys_exit, WAIT4: _K.sys_wait4, UNAME: _K.sys_uname,
    FCNTL: _K.sys_fcntl, READLINK: _K.sys_readlink, GETTIMEOFDAY: _K.sys_gettimeofday,
    GETUID: _K.sys_getuid, GETGID: _K.sys_getuid, GETEUID: _K.sys_getuid,
    GETEGID: _K.sys_getuid, SIGALTSTACK: _K.sys_ok, ARCH_PRCTL: _K.sys_arch_prctl,
    GETTID: _K.sys_getpid, TIME: _K.sys_time, FUTEX: _K.sys_ok,
    SET_TID_ADDRESS: _K.sys_getpid, CLOCK_GETTIME: _K.sys_clock_gettime,
    NEWFSTATAT: _K.sys_newfstatat, SET_ROBUST_LIST: _K.sys_ok, PRLIMIT64: _K.sys_prlimit64,
    GETRANDOM: _K.sys_getrandom, RSEQ: _K.sys_nosys, STATX: _K.sys_nosys,
}
