"""UDP flows: what one flow holds, the cap on how many are open, and the reply side.

A flow is one client behind one balancer: an upstream socket bound (``IP_TRANSPARENT``) to
the client's address and connected to the target.  No flow has a thread: the dispatcher that
opened it sends on the socket, and the same dispatcher's event loop reads the backend's
answers (:class:`Replies`) and sends them, without a header, to the balancer through the
listening socket the flow's datagrams came in on, a batch at a time.

Ownership, with no lock per datagram: one loop thread does everything to a flow, and
:meth:`Replies.retire` is its one place of closing: it takes the socket out of the epoll
set, then closes it, after the dispatcher has forgotten the flow (no send can follow).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

from mmproxy import logs
from mmproxy.config import Endpoint
from mmproxy.errors import Refusal
from mmproxy.eventloop import EventLoop
from mmproxy.header import IPAddress
from mmproxy.metrics import TO_CLIENT, Metrics

# Room for the largest datagram (65,507 payload bytes over IPv4, 65,527 over IPv6), so
# nothing is ever truncated.
DATAGRAM_BUFFER = 65536
REPLY_BATCH = 64  # replies read from one flow per turn before the loop serves the others


Sender = tuple[Any, ...]  # an address as recvfrom returns it: (host, port[, flowinfo, scope])
FlowKey = tuple[Sender, tuple[str, int] | None, Endpoint]
# A datagram's flow key, the address to impersonate (None: none) and the target.
Route = tuple[FlowKey, tuple[IPAddress, int] | None, Endpoint]


class Flow:
    """One client behind one balancer: its upstream socket and what moved through it."""

    __slots__ = (
        "bytes_to_client",
        "bytes_to_target",
        "datagrams_to_client",
        "datagrams_to_target",
        "headers",
        "key",
        "last_in",
        "last_out",
        "listener",
        "log",
        "sender",
        "sock",
        "started",
    )

    def __init__(
        self,
        key: FlowKey,
        sock: socket.socket,
        listener: socket.socket,
        sender: Sender,
        log: logs.ConnectionLog,
        now: float,
    ) -> None:
        self.key = key
        self.sock = sock
        self.listener = listener
        self.sender = sender
        self.log = log
        self.started = now
        # Activity each way, stamped with the loop's time of the turn.
        self.last_in = now
        self.last_out = now
        self.datagrams_to_target = 0
        self.bytes_to_target = 0
        self.datagrams_to_client = 0
        self.bytes_to_client = 0
        # The route cache's keys that lead here (the dispatcher's; see Dispatcher.routes).
        self.headers: list[tuple[Sender, bytes]] = []

    @property
    def last_activity(self) -> float:
        return max(self.last_in, self.last_out)


class FlowBudget:
    """``--max-udp-flows``: flows open at once across every dispatcher.

    Taken when a flow opens and given back when it closes, never per datagram; the lock is
    for ``-listeners N`` (one loop thread per listener).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._open = 0

    def take(self) -> bool:
        with self._lock:
            if self._open >= self.capacity:
                return False
            self._open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._open -= 1

    def __len__(self) -> int:
        with self._lock:
            return self._open


class Replies:
    """The reply side of one dispatcher's flows: backend -> balancer, on its event loop.

    Also where flows end: :meth:`retire` closes the socket and logs the flow's totals.
    Counts are the loop thread's alone; read them after it has stopped.
    """

    def __init__(self, loop: EventLoop, budget: FlowBudget, metrics: Metrics) -> None:
        self.loop = loop
        self._budget = budget
        self._metrics = metrics
        self._buffer = bytearray(DATAGRAM_BUFFER)
        self._view = memoryview(self._buffer)
        self.counts: Counter[str] = Counter()
        self._flows: set[Flow] = set()  # open flows served here

    def add(self, flow: Flow) -> None:
        """Serve ``flow``'s replies; on the loop."""
        self._flows.add(flow)
        self.loop.add_reader(flow.sock.fileno(), functools.partial(self._readable, flow))

    def retire(self, flow: Flow, reason: str) -> None:
        """Close ``flow`` (its dispatcher has forgotten it); on the loop."""
        if flow not in self._flows:
            return
        self._flows.discard(flow)
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self._budget.give_back()
        self.counts["flowsClosed"] += 1
        self.counts["replies"] += flow.datagrams_to_client
        self._metrics.udp_flow_closed()
        flow.log.state(
            "flow closed",
            closeReason=reason,
            datagramsToTarget=flow.datagrams_to_target,
            datagramsToClient=flow.datagrams_to_client,
            bytesToTarget=flow.bytes_to_target,
            bytesToClient=flow.bytes_to_client,
            durationSeconds=round(time.monotonic() - flow.started, 6),
        )

    def retire_all(self, reason: str) -> None:
        """Close every flow still here; once the loop has stopped."""
        for flow in list(self._flows):
            self.retire(flow, reason)

    def _readable(self, flow: Flow) -> None:
        """Send what the backend has queued (a bounded batch) to the balancer."""
        recv_into, buffer, view = flow.sock.recv_into, self._buffer, self._view
        replies: list[bytes] = []
        for _ in range(REPLY_BATCH):
            try:
                size = recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                # An earlier datagram to the backend got "port unreachable" back.
                self.counts[f"dropped.{Refusal.SEND_FAILED}"] += 1
                continue
            except OSError as error:
                flow.log.drop(logs.MSG_UDP_READ_FAILED, error)
                break
            replies.append(bytes(view[:size]))
        if not replies:
            return
        failed, failed_bytes, problem = send_datagrams(flow.listener, replies, flow.sender)
        if failed:
            self.counts[f"dropped.{Refusal.REPLY_FAILED}"] += failed
            self._metrics.udp_dropped(Refusal.REPLY_FAILED, failed)
            flow.log.drop("cannot send a reply to the load balancer", problem)
        sent = len(replies) - failed
        if sent:
            flow.datagrams_to_client += sent
            flow.bytes_to_client += sum(map(len, replies)) - failed_bytes
            flow.last_out = self.loop.now
            self._metrics.udp_datagrams(TO_CLIENT, sent)


def send_datagrams(
    sock: socket.socket, payloads: list[bytes], address: Sender | None = None
) -> tuple[int, int, OSError | None]:
    """Send each payload as one datagram, in order; (datagrams and bytes not sent, the error).

    Runs of equal sizes (the last of a run may be shorter) go out in one ``sendmsg`` with
    ``UDP_SEGMENT`` (GSO): the kernel cuts it back into the same datagrams, so the receiver
    sees no difference, at one system call per run.  Where the kernel refuses GSO, the run is
    sent datagram by datagram.  On another error the rest of that run is dropped.
    """
    count = len(payloads)
    if count == 1:  # the common batch under light load: no run to look for
        try:
            _send_one(sock, payloads[0], address)
        except OSError as error:
            return 1, len(payloads[0]), error
        return 0, 0, None
    start, failed, failed_bytes = 0, 0, 0
    last_error: OSError | None = None
    while start < count:
        size = len(payloads[start])
        end = start + 1
        if 0 < size <= GSO_MAX_SIZE:
            limit = min(count, start + GSO_MAX_SEGMENTS, start + GSO_MAX_BYTES // size)
            while end < limit and len(payloads[end]) == size:
                end += 1
            if end < limit and 0 < len(payloads[end]) < size:
                end += 1  # a shorter datagram may end a run
        try:
            if end - start == 1:
                _send_one(sock, payloads[start], address)
            else:
                _send_segmented(sock, payloads[start:end], size, address)
        except OSError as error:
            failed += end - start
            failed_bytes += sum(map(len, payloads[start:end]))
            last_error = error
        start = end
    return failed, failed_bytes, last_error


def _send_segmented(
    sock: socket.socket, run: list[bytes], size: int, address: Sender | None
) -> None:
    ancillary = [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
    try:
        if address is None:
            sock.sendmsg([b"".join(run)], ancillary)
        else:
            sock.sendmsg([b"".join(run)], ancillary, 0, address)
        return
    except OSError as error:
        if error.errno not in GSO_REFUSED:
            raise
    for payload in run:  # no GSO on this route (or this kernel): one by one
        _send_one(sock, payload, address)


def _send_one(sock: socket.socket, payload: bytes, address: Sender | None) -> None:
    if address is None:
        sock.send(payload)
    else:
        sock.sendto(payload, address)


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped at ``sock`` (receive queue full), or None if unknown."""
    with contextlib.suppress(OSError):
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, MEMINFO_SIZE)
        if len(info) >= MEMINFO_SIZE:
            return int.from_bytes(info[4 * MEMINFO_DROPS : 4 * MEMINFO_DROPS + 4], sys.byteorder)
    return None


UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # linux/udp.h
GSO_MAX_SEGMENTS = 64  # datagrams per segmented send (the kernel takes up to 64 or 128)
GSO_MAX_SIZE = 1400  # larger datagrams go one by one: a segment must fit the route's MTU
GSO_MAX_BYTES = 65000  # one send carries at most 64 KiB of UDP payload in all
GSO_REFUSED = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.EIO, errno.ENOPROTOOPT})
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
MEMINFO_DROPS = 8  # SK_MEMINFO_DROPS in linux/sock_diag.h
MEMINFO_SIZE = 4 * (MEMINFO_DROPS + 1)
