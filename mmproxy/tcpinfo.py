"""What the kernel says about one TCP socket: ``TCP_INFO``, the queue ioctls, poll events.

The kernel relay (:mod:`mmproxy.sockmap`) cannot read its sockets once they are in a map;
these counters are how it learns what moved and what is left.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
from dataclasses import dataclass

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
TCP_ESTABLISHED = 1  # tcpi_state values (include/net/tcp_states.h)
# The states a socket is in once its peer's FIN arrived.
FIN_RECEIVED = frozenset({6, 8, 9, 11})  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING

# struct tcp_info (include/uapi/linux/tcp.h): the fields read here, by offset.
_TCP_INFO_SIZE = 136
_STATE, _LAST_DATA_SENT, _LAST_DATA_RECV, _BYTES_ACKED, _BYTES_RECEIVED = 0, 44, 52, 120, 128

WATCH = select.POLLIN | select.POLLRDHUP | select.POLLPRI


def cookie(sock: socket.socket) -> bytes:
    """The socket's cookie (``SO_COOKIE``): the key the relay program looks sockets up by."""
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """What ``TCP_INFO`` and ``SIOCOUTQ`` say about one socket."""

    state: int
    last_data_sent: int  # milliseconds ago
    last_data_recv: int
    bytes_acked: int  # sequence space: counts a SYN or FIN too
    bytes_received: int
    outq: int  # written but not acknowledged yet

    @property
    def taken_in(self) -> int:
        """Bytes written into this socket so far (acknowledged or queued), plus SYN/FIN."""
        return self.bytes_acked + self.outq


def counters(sock: socket.socket, outq: bool = True) -> TcpCounters:
    """``TCP_INFO``, and ``SIOCOUTQ`` unless ``outq`` is False (then ``outq`` reads 0)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0] if outq else 0
    return TcpCounters(
        raw[_STATE],
        struct.unpack_from("<I", raw, _LAST_DATA_SENT)[0],
        struct.unpack_from("<I", raw, _LAST_DATA_RECV)[0],
        struct.unpack_from("<Q", raw, _BYTES_ACKED)[0],
        struct.unpack_from("<Q", raw, _BYTES_RECEIVED)[0],
        queued,
    )


def inq(sock: socket.socket) -> int:
    """Bytes queued for reading (``SIOCINQ``)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0\0\0\0"))[0])


def revents(sock: socket.socket) -> int:
    """The socket's poll events now (readable, ended, failed), without waiting."""
    poller = select.poll()
    poller.register(sock, WATCH)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What user space needs to know of a socket before handing it to the kernel."""

    consumed: int  # bytes user space read from the socket (received, less still queued)
    taken_in: int  # bytes written into it so far (sequence space, see TcpCounters)
    ended: bool  # no longer established: a FIN came or went, or a reset


def snapshot(sock: socket.socket) -> Snapshot:
    """One socket's counters, read again until nothing arrived, was acknowledged or changed
    the state meanwhile.  An ACK between TCP_INFO and SIOCOUTQ makes ``taken_in`` too small
    (the FIN too early).  And TCP_INFO reads the state before it locks the socket for the
    counters: a FIN arriving in between shows in ``bytes_received`` with the state still
    established, which counted the FIN as a byte read (seen under load: a failed insertion
    then looked like the kernel had taken -1 bytes)."""
    while True:
        before = counters(sock)
        queued = inq(sock)
        after = counters(sock, outq=False)
        if (after.state, after.bytes_received, after.bytes_acked) == (
            before.state,
            before.bytes_received,
            before.bytes_acked,
        ):
            fin = before.state in FIN_RECEIVED  # counted as a byte received, read by none
            consumed = before.bytes_received - queued - fin
            return Snapshot(consumed, before.taken_in, before.state != TCP_ESTABLISHED)
