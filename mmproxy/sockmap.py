"""The kernel relay (``--relay sockmap``): an established pair forwarded inside the kernel.

Both sockets of a pair go into BPF SOCKHASH maps whose SK_SKB stream-verdict program
(:mod:`mmproxy.bpf`) sends every segment arriving on one socket out of the other.  No thread
wakes per message; the pair's ends, errors and idle time are watched by the parking lot's
epoll, and the pair holds no thread between those events.

How a pair is handed over (:meth:`KernelPair.start`), and why in this order:

1. **Drain in user space.**  Each socket is read (``MSG_DONTWAIT``) until it has nothing
   queued, and what was read is sent on.  A segment partly consumed by ``recv`` (the PROXY
   header read, payload left in the same skb) must never reach the verdict, which takes
   skbs *whole* (with strparser in front it was lost instead).  A socket read until EAGAIN
   holds no partly consumed skb, so the plain stream verdict (no parser) is correct.
2. **Insert into the target map, then the verdict map.**  The redirect looks its partner
   up in ``targets`` (keyed by cookie, see :mod:`mmproxy.bpf`), a map with no program.
   Sockets join ``verdicts`` (the map that carries the program) only once both are in
   ``targets``: had one map served both, the first socket inserted would run the verdict
   while its partner was not yet there, and a segment arriving in that window would miss.
3. **Kick.**  Segments that arrived between the drain and the insertion wait in the
   receive queue; the verdict only runs on the next arrival.  Setting ``SO_RCVLOWAT``
   makes TCP signal "data ready" at once, which runs the verdict on them.

A FIN is not redirected: the end of one direction is seen as ``EPOLLRDHUP`` and relayed
with ``shutdown(SHUT_WR)`` only after everything the kernel took from that socket has been
written to the partner (``TCP_INFO`` and ``SIOCOUTQ`` say how much that is), so the FIN
goes out behind the data.  The same counters give the byte counts at the end.

After insertion nothing in user space may read these sockets (a blocking ``recv`` would
sleep forever: the data never reaches the receive queue); ends are watched with
``EPOLLRDHUP``, never with ``recv``.

A known kernel fault (6.18): a segment that repeats some bytes already received (a
retransmission cut differently from the original) is queued by TCP as it came, and the
verdict redirects it whole, so the partner gets those bytes twice (TCP's own reads skip
them).  Nothing here can trim it; a direction's end finds the surplus in the counters and
resets the pair rather than end a corrupted stream like a good one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from mmproxy import bpf
from mmproxy.parking import ParkingLot
from mmproxy.relay import Pair
from mmproxy.tcpinfo import cookie, counters, revents, snapshot

# What a parked pair waits for: an end (errors and hang-ups come anyway).  Not EPOLLIN: the
# kernel signals "data ready" for every segment it redirects, and each would wake the lot.
_ENDS = select.EPOLLRDHUP

DRAIN_LIMIT = 4 << 20  # bytes read in user space before giving up on a quiet moment
# Each socket's send buffer (doubled by the kernel): a full one makes the kernel's writer
# wait a timer tick, the bound on one bulk connection (bench/README.md).
SEND_BUFFER = 16 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
DRAIN_CHUNK = 64 * 1024  # bytes per read while draining
# How often a direction whose end arrived looks at whether its partner has written
# everything yet (doubling from the first to the last).
FLUSH_POLL = (0.001, 0.05)
# The kernel writes redirected data from a work queue, usually within microseconds: a
# direction whose end just arrived looks this many times, this far apart, on its pool
# thread before it parks (the lot's epoll cannot wait less than a millisecond).
FLUSH_SPIN = (8, 0.00005)

# Why a pair was not handed to the kernel (the splice relay then takes it).
FALLBACK_INSERT = "insert_failed"  # the map is full, or the kernel refused (ENOMEM, ...)
FALLBACK_BUSY = "busy"  # data kept coming while draining: never a quiet moment to hand over
# A side already sent its FIN: sockmap takes only ESTABLISHED sockets (EOPNOTSUPP otherwise),
# and what is left is one direction, which splice relays as well.
FALLBACK_ENDED = "ended"


class UnavailableError(Exception):
    """The kernel relay cannot work here; ``str()`` says why in one line."""


class KernelRelay:
    """The daemon's two maps and the verdict program; one per daemon.

    ``capacity`` pairs fit (two sockets each); a pair that finds no room is relayed by
    splice instead.  :meth:`open` raises :class:`UnavailableError` when the kernel, the
    privileges or a sandbox do not allow it.
    """

    def __init__(self, targets: int, verdicts: int, program: int, capacity: int) -> None:
        self._targets = targets
        self._verdicts = verdicts
        self._program = program
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held = 0
        self._closed = False

    @classmethod
    def open(cls, capacity: int) -> KernelRelay:
        fds: list[int] = []
        try:
            targets = bpf.create_sockhash(2 * capacity)
            fds.append(targets)
            verdicts = bpf.create_sockhash(2 * capacity)
            fds.append(verdicts)
            program = bpf.load_program(bpf.redirect_program(targets))
            fds.append(program)
            bpf.attach(verdicts, program, bpf.BPF_SK_SKB_STREAM_VERDICT)
        except bpf.BpfError as error:
            for fd in fds:
                os.close(fd)
            raise UnavailableError(_explain(error)) from error
        return cls(targets, verdicts, program, capacity)

    def close(self) -> None:
        """Close the maps and the program (the daemon does, after every pair has finished)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for fd in (self._verdicts, self._targets, self._program):
            os.close(fd)

    @property
    def held(self) -> int:
        """Pairs in the kernel now."""
        with self._lock:
            return self._held

    def insert(self, keys: tuple[bytes, bytes], a: socket.socket, b: socket.socket) -> None:
        """Make each of ``a`` and ``b`` (whose cookies are ``keys``) redirect to the other;
        raises OSError, inserting nothing."""
        with self._lock:
            if self._closed or self._held >= self.capacity:
                raise OSError(errno.E2BIG, "the socket map is full")
            self._held += 1
        done: list[tuple[int, bytes]] = []
        try:
            for table, key, sock in (
                (self._targets, keys[0], b),
                (self._targets, keys[1], a),
                (self._verdicts, keys[0], a),
                (self._verdicts, keys[1], b),
            ):
                bpf.update(table, key, sock.fileno())
                done.append((table, key))
        except BaseException:
            for table, key in reversed(done):
                with contextlib.suppress(OSError):
                    bpf.delete(table, key)
            self.release()
            raise

    def remove(self, keys: tuple[bytes, bytes]) -> None:
        """Take the pair out of both maps: verdicts first, so nothing is redirected to a gap."""
        for table in (self._verdicts, self._targets):
            for key in keys:
                with contextlib.suppress(OSError):  # a closed or reset socket left on its own
                    bpf.delete(table, key)
        self.release()

    def release(self) -> None:
        """A pair left the maps (on its own: closing a socket takes it out of every map)."""
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


class KernelPair:
    """One established pair relayed by the kernel, from hand-over to close.

    ``done`` runs once, after the pair is out of the maps and closed; the pair's byte
    counters, ``error`` and ``idle`` then hold the outcome.  Between events nothing runs:
    the sockets wait in ``parking``, and each event runs :meth:`_step` on the pool.
    """

    def __init__(
        self,
        kernel: KernelRelay,
        pair: Pair,
        parking: ParkingLot,
        done: Callable[[], None],
        idle_timeout: float = 0.0,
    ) -> None:
        self._kernel = kernel
        self._pair = pair
        self._parking = parking
        self._done = done
        self._idle_timeout = idle_timeout
        self._socks = (pair.client, pair.upstream)
        self._counts = (pair.to_target, pair.to_client)  # by the socket read from
        self._ended = [False, False]  # a direction's end relayed (by its source side)
        self._fin = [False, False]  # its source's FIN is in bytes_received
        self._consumed = [0, 0]  # bytes user space read from each socket
        self._base = [0, 0]  # taken_in of each socket at insertion
        self._user_sent = [0, 0]  # counters at insertion: what user space wrote
        self._final: list[int | None] = [None, None]  # bytes the kernel moved, once known
        self._flush_wait = FLUSH_POLL[0]
        self._keys = (b"", b"")  # the sockets' cookies, their keys in the maps
        self._finished = False

    # ------------------------------------------------------------ hand-over

    def start(self) -> str | None:
        """Drain, insert, kick, watch.  None: the kernel has the pair (``done`` will run).

        Otherwise the fallback reason: the pair was not inserted, and the caller relays
        it with splice as usual (nothing was lost; what was drained was sent on and
        counted, and a side that ended was half-closed).  Raises OSError when a socket
        failed while draining; the pair is then the caller's to end.
        """
        if not self._drain():
            return FALLBACK_BUSY
        shots = [snapshot(sock) for sock in self._socks]
        if any(self._ended) or any(shot.ended for shot in shots):
            return FALLBACK_ENDED
        for side, shot in enumerate(shots):  # before insertion: the kernel moves at once
            self._consumed[side] = shot.consumed
            self._base[side] = shot.taken_in
            self._user_sent[side] = self._counts[1 - side][0]
        self._keys = (cookie(self._socks[0]), cookie(self._socks[1]))
        try:
            self._kernel.insert(self._keys, *self._socks)
        except OSError as error:
            return self._not_inserted(error)
        for sock in self._socks:  # the buffer, then the kick
            for option, value in ((SO_SNDBUFFORCE, SEND_BUFFER), (socket.SO_RCVLOWAT, 1)):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, value)
        self._step(look=False)  # an end or error already there shows in the lot at once
        return None

    def _drain(self) -> bool:
        """Read both sockets until nothing is queued, sending it on; False if it never stops."""
        budget = DRAIN_LIMIT
        quiet = [False, False]
        while not all(quiet):
            for side, src in enumerate(self._socks):
                if quiet[side]:
                    continue
                dst = self._socks[1 - side]
                try:  # usually EAGAIN at once: no buffer is kept for it
                    data = src.recv(DRAIN_CHUNK, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    quiet[side] = True
                    continue
                if not data:
                    quiet[side] = self._ended[side] = True
                    _half_close(dst)
                    continue
                dst.sendall(data)
                self._counts[side][0] += len(data)
                budget -= len(data)
                # The other side may have data again by now: it is looked at once more.
                quiet[1 - side] = self._ended[1 - side]
            if budget <= 0:
                return False
        return True

    def _not_inserted(self, error: OSError) -> str:
        """After a failed insertion: the fallback reason (``ended`` when a side's FIN came
        since the snapshot, which is why the kernel refused it); raises OSError if a socket
        ran the verdict meanwhile: what it redirected was dropped with the partner's queue,
        and splice cannot resend it."""
        ended = False
        for side, sock in enumerate(self._socks):
            shot = snapshot(sock)
            if taken := shot.consumed - self._consumed[side]:
                raise OSError(
                    errno.EIO,
                    f"the kernel took {taken} bytes from the {_SIDES[side]} socket of a pair"
                    f" it could not relay (insertion: {error.strerror or error})",
                )
            ended = ended or shot.ended
        return FALLBACK_ENDED if ended else FALLBACK_INSERT

    # ------------------------------------------------------------ watching

    def _step(self, look: bool = True) -> None:
        """Look at both sockets and act; then wait in the parking lot for the next event."""
        try:
            if look and self._advance():
                self._finish()
                return
            self._park()
        except _SurplusError as error:
            self._pair.error = error
            for sock in self._socks:  # closed with SO_LINGER 0: a reset, not a FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self._finish()
        except OSError as error:
            self._fail(error)
        except BaseException:
            self._fail(None)
            raise

    def _advance(self) -> bool:
        """Relay whatever ended and can be relayed now; True when the pair is over."""
        if self._pair.aborted:  # shut down from outside (stop, idle): nothing more will flow
            return True
        wait = False
        for side, sock in enumerate(self._socks):
            events = revents(sock)
            if events & select.POLLERR:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
            # POLLHUP alone is an end too: the FIN came after ours (then RDHUP is set as well).
            if self._ended[side] or not events & (select.POLLRDHUP | select.POLLHUP):
                continue
            self._fin[side] = True
            flushed = self._flushed(side)
            if flushed is None:
                wait = True
                continue
            self._final[side], surplus = flushed
            if surplus:  # a corrupted stream must not end like a good one: reset both
                raise _SurplusError(errno.EIO, f"the kernel relay wrote {surplus} bytes twice")
            self._ended[side] = True
            _half_close(self._socks[1 - side])
        if wait:
            return False
        if all(self._ended):
            return True
        if self._idle_timeout > 0 and self._idle_for() >= self._idle_timeout:
            for side in range(2):  # counted before expire() sends FINs
                if self._final[side] is None:
                    self._final[side] = self._moved(side)
            self._pair.expire()
            return True
        return False

    def _moved(self, side: int) -> int:
        """Bytes the kernel took from socket ``side`` (for its partner)."""
        received = counters(self._socks[side]).bytes_received - (1 if self._fin[side] else 0)
        return max(0, received - self._consumed[side])

    def _flushed(self, side: int) -> tuple[int, int] | None:
        """Once the partner took in all the kernel took from ``side``: that count and what the
        partner took in beyond it (a duplicate); None while some is still on its way."""
        moved = self._moved(side)  # final: nothing arrives after the FIN
        tries, pause = FLUSH_SPIN
        for _ in range(tries):
            if (flushed := self._flushed_now(side, moved)) is not None:
                return flushed
            time.sleep(pause)
        return self._flushed_now(side, moved)

    def _flushed_now(self, side: int, moved: int) -> tuple[int, int] | None:
        partner = 1 - side
        written = counters(self._socks[partner]).taken_in - self._base[partner]
        return (moved, written - moved) if written >= moved else None

    def _final_count(self, side: int) -> int:
        """Bytes the kernel moved from ``side``, for a direction that did not end cleanly:
        unknown FINs (an abort sends ours, a peer may answer) each add one to the counters,
        so the lower of what the source received and what the partner took in is the count."""
        final = self._final[side]
        if final is not None:
            return final
        partner = 1 - side
        written = counters(self._socks[partner]).taken_in - self._base[partner]
        if self._pair.aborted:
            written -= 1
        return max(0, min(self._moved(side), written))

    def _idle_for(self) -> float:
        """Seconds since either socket last received or sent data."""
        infos = [counters(sock) for sock in self._socks]
        return min(min(i.last_data_recv, i.last_data_sent) for i in infos) / 1000.0

    def _park(self) -> None:
        flushing = any(self._fin[side] and not self._ended[side] for side in range(2))
        if flushing:
            timeout = self._flush_wait
            self._flush_wait = min(self._flush_wait * 2, FLUSH_POLL[1])
        elif self._idle_timeout > 0:
            timeout = max(self._idle_timeout - self._idle_for(), 0.001)
        else:
            timeout = 0.0
        # A side whose end was seen stays readable (level-triggered): it is no longer
        # watched, or the lot would hand the pair over again at once.  Errors and a
        # shutdown both ways still show on the other side.
        watched = tuple(sock for side, sock in enumerate(self._socks) if not self._fin[side])
        try:
            self._parking.park_sockets(
                watched,
                self._step,
                self._fail,
                timeout=timeout,
                abandon=self._abandon,
                events=_ENDS,
            )
        except RuntimeError:  # the lot is closed: the daemon is stopping
            self._pair.abort()
            self._finish()

    # ------------------------------------------------------------ the end

    def _abandon(self) -> None:
        self._pair.abort()
        self._finish()

    def _fail(self, error: BaseException | None) -> None:
        pair = self._pair
        if isinstance(error, OSError) and pair.error is None:
            pair.error = error
        pair.abort()
        self._finish()

    def _finish(self) -> None:
        """Count, take the pair out of the maps, close it, report; once."""
        if self._finished:
            return
        self._finished = True
        for side in range(2):
            with contextlib.suppress(OSError):  # a socket that failed keeps what was counted
                self._counts[side][0] = self._user_sent[1 - side] + self._final_count(side)
        if all(self._ended) and not self._pair.aborted:
            self._pair.close()  # both ways over, nothing in flight: the close unlinks them
            self._kernel.release()
        else:
            self._kernel.remove(self._keys)  # before the close: nothing redirected to a gap
            self._pair.close()
        self._done()


class _SurplusError(OSError):
    """The kernel wrote into a socket more than it read from the partner (module docstring)."""


_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 seconds
_SIDES = ("client", "upstream")


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise
