"""The kernel relay's shared state: its maps, its program, and the thread that hears it.

One :class:`KernelRelay` per daemon.  Four maps, all keyed by socket cookie: ``targets``
(each socket under its partner's cookie: where the program redirects), ``verdicts`` (the
sockets whose segments the program sees; carries the program), ``taken`` (bytes the program
moved from each socket, counted by the program alone) and ``allowed`` (the count past which
the program reports, written by user space alone).  Reports arrive in a ring buffer; a thread
reads them and pokes the pair they name (:meth:`mmproxy.sockmap.KernelPair.poke`), which
then looks at its backlog.  How one pair is handed over and watched is :mod:`mmproxy.sockmap`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
from typing import Protocol

from mmproxy import bpf
from mmproxy.ringbuf import RingBuffer
from mmproxy.tcpinfo import cookie

# Flow control: the most a direction may have taken from its source and not yet written
# into its destination socket (it waits on the destination's psock, in kernel memory).
BACKLOG_LIMIT = 4 << 20
_RECORD = 16  # bytes a ring buffer record of one cookie takes


class Poked(Protocol):
    """A pair the report thread can wake: it looks at itself now, if it is waiting."""

    def poke(self) -> None: ...


class UnavailableError(Exception):
    """The kernel relay cannot work here; ``str()`` says why in one line."""


class KernelRelay:
    """The daemon's maps, the verdict program and the thread that hears its reports.

    ``capacity`` pairs fit (two sockets each); a pair that finds no room is relayed by
    splice instead.  :meth:`open` raises :class:`UnavailableError` when the kernel, the
    privileges or a sandbox do not allow it.
    """

    def __init__(self, fds: tuple[int, ...], events: RingBuffer, capacity: int) -> None:
        self._fds = fds
        self._targets, self._verdicts, self._taken, self._allowed, self._program = fds
        self._events = events
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held = 0
        self._pairs: dict[bytes, Poked] = {}  # by each socket's cookie
        self._closed = False
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._listen, name="mmproxy-sockmap", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, capacity: int) -> KernelRelay:
        fds: list[int] = []
        events: RingBuffer | None = None
        try:
            fds.append(bpf.create_sockhash(2 * capacity))
            fds.append(bpf.create_sockhash(2 * capacity))
            fds.append(bpf.create_map(bpf.BPF_MAP_TYPE_HASH, 8, 8, 2 * capacity))
            fds.append(bpf.create_map(bpf.BPF_MAP_TYPE_HASH, 8, 8, 2 * capacity))
            # One report per direction at most is unread (the next needs a new allowance,
            # given after the report was read): this much room never runs out.
            events = RingBuffer(2 * capacity * _RECORD)
            fds.append(bpf.load_program(bpf.redirect_program(fds[0], fds[2], fds[3], events.fd)))
            bpf.attach(fds[1], fds[4], bpf.BPF_SK_SKB_STREAM_VERDICT)
        except bpf.BpfError as error:
            for fd in fds:
                os.close(fd)
            if events is not None:
                events.close()
            raise UnavailableError(_explain(error)) from error
        return cls(tuple(fds), events, capacity)

    def close(self) -> None:
        """Close the maps and the program (the daemon does, after every pair has finished)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._stop, 1)
        self._thread.join()
        for fd in (*self._fds, self._stop):
            os.close(fd)
        self._events.close()

    @property
    def held(self) -> int:
        """Pairs in the kernel now."""
        with self._lock:
            return self._held

    def insert(self, a: socket.socket, b: socket.socket, pair: Poked) -> None:
        """Make each of ``a`` and ``b`` redirect to the other; raises OSError, inserting nothing."""
        with self._lock:
            if self._closed or self._held >= self.capacity:
                raise OSError(errno.E2BIG, "the socket map is full")
            self._held += 1
        keys = (cookie(a), cookie(b))
        done: list[tuple[int, bytes]] = []
        nothing, allowance = struct.pack("<Q", 0), struct.pack("<Q", BACKLOG_LIMIT)
        try:
            for table, key, value in (
                (self._taken, keys[0], nothing),
                (self._taken, keys[1], nothing),
                (self._allowed, keys[0], allowance),
                (self._allowed, keys[1], allowance),
                (self._targets, keys[0], b),
                (self._targets, keys[1], a),
                (self._verdicts, keys[0], a),
                (self._verdicts, keys[1], b),
            ):
                if isinstance(value, bytes):
                    bpf.store(table, key, value)
                else:
                    bpf.update(table, key, value.fileno())
                done.append((table, key))
        except BaseException:
            for table, key in reversed(done):
                with contextlib.suppress(OSError):
                    bpf.delete(table, key)
            self._release()
            raise
        with self._lock:
            self._pairs.update(dict.fromkeys(keys, pair))

    def remove(self, a: socket.socket, b: socket.socket) -> None:
        """Take the pair out of the maps: verdicts first, so nothing is redirected to a gap."""
        keys = []
        for sock in (a, b):
            with contextlib.suppress(OSError):  # a closed socket left the maps on its own
                keys.append(cookie(sock))
        for table in (self._verdicts, self._targets, self._taken, self._allowed):
            for key in keys:
                with contextlib.suppress(OSError):  # not there: a reset socket leaves the maps
                    bpf.delete(table, key)
        with self._lock:
            for key in keys:
                self._pairs.pop(key, None)
        self._release()

    def taken(self, sock: socket.socket) -> int:
        """Bytes the program has redirected from ``sock`` since its insertion."""
        return int(struct.unpack("<Q", bpf.lookup(self._taken, cookie(sock), 8))[0])

    def allow(self, sock: socket.socket, allowance: int) -> None:
        """Report when the bytes taken from ``sock`` pass ``allowance``."""
        bpf.store(self._allowed, cookie(sock), struct.pack("<Q", allowance))

    def pause(self, sock: socket.socket) -> None:
        """Stop redirecting what arrives on ``sock``: its target leaves the map, so the
        program's lookup misses and passes the data to ``sock``'s own queue, charged to its
        receive buffer (the window closes when that is full).  Taking ``sock`` out of the
        verdict map instead races a verdict running on another CPU, which then drops the
        segment it already took (seen: 64 KiB lost in half the bulk runs)."""
        bpf.delete(self._targets, cookie(sock))

    def _listen(self) -> None:
        """The thread: each report names a socket whose allowance is spent; its pair looks."""
        poller = select.poll()
        poller.register(self._events.fd, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        while True:
            poller.poll()
            with self._lock:
                if self._closed:
                    return
            for key in self._events.read():
                with self._lock:
                    pair = self._pairs.get(key)
                if pair is not None:
                    pair.poke()

    def _release(self) -> None:
        with self._lock:
            self._held -= 1


def _explain(error: bpf.BpfError) -> str:
    code = error.errno
    if code in (errno.EPERM, errno.EACCES):
        return (
            f"{error.strerror} (needs CAP_BPF and CAP_NET_ADMIN, and bpf(2) not blocked by seccomp)"
        )
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return f"{error.strerror} (the kernel lacks SOCKHASH/SK_SKB verdict support; needs 5.13+)"
    return str(error.strerror or error)
