"""A UDP dispatcher: one listening socket, the flows it opened, their idle deadlines.

Each listening socket (``-listeners N`` of them, on one port with ``SO_REUSEPORT``) has one
dispatcher, and each dispatcher runs on an event loop of its own: it drains the socket in
bounded batches, checks each sender against the allowed subnets, and queues the payload for
the datagram's flow; at the end of the batch each flow's payloads go out in order, a run of
equal sizes in one system call (:func:`~mmproxy.flows.send_datagrams`).  A balancer's
address and port always hash to the same socket, so a flow's datagrams all reach the same
dispatcher and its tables need no lock.

The route cache maps (sender, header bytes) to an open flow, so a flow's later datagrams
skip the parse: it is filled only once the flow exists, with a few headers per flow of at
most ``CACHED_HEADER`` bytes each, and emptied with the flow.  Any other datagram is parsed.

Opening a flow takes a few system calls on this thread (no thread starts), so a burst of
first datagrams waits in the listening socket's receive queue (8 MiB) while flows open, and
nothing is lost in between.  Datagrams the kernel still drops there, because the queue was
full, are read from the socket's counters every second, then counted and logged.

Idle flows expire by one heap of deadlines per dispatcher: the earliest is checked when it
falls due, and a flow that moved meanwhile goes back with its new deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mmproxy import logs, upstream
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config
from mmproxy.errors import HeaderError, Refusal, RefusedError
from mmproxy.eventloop import EventLoop
from mmproxy.flows import (
    DATAGRAM_BUFFER,
    Flow,
    FlowBudget,
    FlowKey,
    Replies,
    Route,
    Sender,
    kernel_drops,
    send_datagrams,
)
from mmproxy.header import host_port
from mmproxy.listener import RESOURCE_ERRORS, ListenerThread, Throttle
from mmproxy.metrics import TO_TARGET, Metrics
from mmproxy.policy import Destinations
from mmproxy.protocol import V2_FIXED_LENGTH, V2_SIGNATURE

READ_BATCH = 64  # datagrams read from the listening socket per turn of the loop
CACHED_HEADER = 256  # longest header kept in the route cache (longer ones are parsed each time)
HEADERS_PER_FLOW = 2  # distinct header byte strings cached per flow
DROP_CHECK = 1.0  # seconds between two readings of the kernel's drop counter
# The loop polls between turns only while at most this many flows sent datagrams in the last
# DROP_CHECK: polling pays where a flow or two wait on round trips, and costs where many flows
# keep the loop busy anyway (smaller turns, more CPU per datagram; bench/README.md).
POLLING_FLOWS = 2

RouteOf = Callable[[memoryview, Sender], tuple[Route, int]]


@dataclass(frozen=True)
class Shared:
    """What every dispatcher of one server uses."""

    config: Config
    log: logging.Logger
    flow_log: logs.ConnectionLog
    allow_list: AllowListHolder
    metrics: Metrics
    budget: FlowBudget
    route_of: RouteOf  # parse a datagram's header and choose its route (UdpServer)
    full: Throttle  # the flow-limit warning's
    dropping: Throttle  # the kernel-drop warning's
    destinations: Destinations | None = None  # with -dynamic-destination (mmproxy.policy)


class Dispatcher(ListenerThread):
    """Serves one listening UDP socket on its event loop: datagrams in, flows, their replies
    (:class:`~mmproxy.flows.Replies`, on the same loop), expiry."""

    THREAD_NAME = "mmproxy-udp"

    def __init__(self, sock: socket.socket, number: int, shared: Shared) -> None:
        super().__init__(sock, number, shared.log)
        self._shared = shared
        self._first_only = shared.config.udp_header == "first"
        close_after = shared.config.close_after
        self._close_after = float(close_after) if close_after else math.inf
        self.loop = EventLoop()
        self.replies = Replies(self.loop, shared.budget, shared.metrics)
        self.flows: dict[FlowKey, Flow] = {}
        self.routes: dict[tuple[Sender, bytes], Flow] = {}  # the route cache (see above)
        self._generation: tuple[int, int] | None = None  # of the destinations it was filled by
        self._pending: dict[Flow, list[bytes]] = {}  # payloads of this batch, per flow
        self._latest: dict[Sender, Flow] = {}  # --udp-header first: each sender's latest flow
        self._deadlines: list[tuple[float, int, Flow]] = []  # heap; the int breaks ties
        self._order = itertools.count()
        self._buffer = bytearray(DATAGRAM_BUFFER)
        self._view = memoryview(self._buffer)
        # What this dispatcher received, forwarded and dropped: its loop's alone, read by the
        # server after the loop has stopped.
        self.counts: Counter[str] = Counter()
        self._received = 0
        self._forwarded = 0
        self._reported = 0  # forwarded datagrams already given to the metrics
        self._kernel_drops = kernel_drops(sock) or 0
        self._next_check = 0.0
        self._moved = 0  # flows that sent datagrams since the last check (see POLLING_FLOWS)
        self._count_from = 0.0
        self.loop.timer = self._tick
        self.loop.add_reader(sock.fileno(), self._readable)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        """Stop reading, then close every flow; returns once the loop has ended."""
        self.stopping.set()
        self.loop.stop()
        if self._thread.ident is not None:  # started
            self._thread.join()
        # The loop has ended: this thread owns the flows now.
        self._check_drops()
        self.flows.clear()
        self.routes.clear()
        self._latest.clear()
        self._deadlines.clear()
        self.replies.retire_all("stopping")
        self.counts["received"] += self._received
        self.counts["forwarded"] += self._forwarded
        self.loop.close()

    # ------------------------------------------------------------------ datagrams in

    def _readable(self) -> None:
        """Read a batch, deliver or drop each datagram, then send the batch (:meth:`_flush`).

        The route cache's hits are served inline (no call per datagram); the allowed subnets
        and the destinations' generation are read once per batch, so a reload applies from
        the next batch.
        """
        recvfrom_into, buffer, view = self.sock.recvfrom_into, self._buffer, self._view
        allows = self._shared.allow_list.current.allows
        destinations = self._shared.destinations
        if destinations is not None and destinations.generation() != self._generation:
            self._forget_routes(destinations.generation())  # a reload or an address change
        routes, pending, first_only = self.routes, self._pending, self._first_only
        # The last cache hit of this batch: with one busy flow most datagrams repeat it, and
        # then no key is built or looked up.  Any slow path forgets it (--udp-header first
        # may have moved its sender to another flow).
        last_sender: Sender | None = None
        last_header = b""
        last_batch: list[bytes] = []
        received = 0
        for _ in range(READ_BATCH):
            try:
                size, sender = recvfrom_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in RESOURCE_ERRORS:
                    self._warn_resource(error)
                    break
                continue  # e.g. ECONNREFUSED from an ICMP error about an earlier reply
            received += 1
            if not allows(sender[0]):
                self._dropped(Refusal.NOT_ALLOWED, "peer is not in the allowed subnets", "", sender)
                continue
            if size >= V2_FIXED_LENGTH and buffer.startswith(V2_SIGNATURE):
                end = V2_FIXED_LENGTH + (buffer[14] << 8 | buffer[15])
                if end < size or (end == size and not first_only):
                    if (
                        sender == last_sender
                        and end == len(last_header)
                        and buffer.startswith(last_header)
                    ):
                        last_batch.append(bytes(view[end:size]))
                        continue
                    header = bytes(view[:end])
                    flow = routes.get((sender, header))
                    if flow is not None:
                        batch = pending.get(flow)
                        if batch is None:
                            batch = pending[flow] = []
                        batch.append(bytes(view[end:size]))
                        if first_only:
                            self._latest[sender] = flow
                        last_sender, last_header, last_batch = sender, header, batch
                        continue
            self._slow_path(size, sender)
            last_sender = None
        self._received += received
        self._flush()
        if self._forwarded != self._reported:
            self._shared.metrics.udp_datagrams(TO_TARGET, self._forwarded - self._reported)
            self._reported = self._forwarded

    def _slow_path(self, size: int, sender: Sender) -> None:
        """A datagram the route cache did not place: admit it, or drop it with a reason."""
        try:
            self._admit(size, sender)
        except RefusedError as drop:
            self._dropped(drop.reason, drop.message, drop.detail, sender)
        except HeaderError as error:
            self._dropped(error.reason.value, "invalid PROXY header", error, sender)

    def _forget_routes(self, generation: tuple[int, int]) -> None:
        """Empty the route cache: the next datagram of each flow is checked afresh."""
        self.routes.clear()
        for flow in self.flows.values():
            flow.headers.clear()
        self._generation = generation

    def _queue(self, flow: Flow, payload: bytes) -> None:
        """Send ``payload`` on ``flow`` at the end of this batch (see :meth:`_flush`)."""
        batch = self._pending.get(flow)
        if batch is None:
            self._pending[flow] = [payload]
        else:
            batch.append(payload)

    def _flush(self) -> None:
        """Send the batch's payloads, each flow's in order, runs of one size in one call."""
        now = self.loop.now
        for flow, payloads in self._pending.items():
            failed, failed_bytes, error = send_datagrams(flow.sock, payloads)
            if failed:
                # ECONNREFUSED: an earlier datagram found no backend listening (ICMP).
                self._dropped(
                    Refusal.SEND_FAILED,
                    "cannot send the datagram to the target",
                    error.strerror if error is not None and error.strerror else "",
                    flow.sender,
                    failed,
                )
            sent = len(payloads) - failed
            if sent:
                if flow.last_in < self._count_from or not flow.datagrams_to_target:
                    self._moved += 1  # its first batch since the last check (or ever)
                flow.last_in = now
                flow.datagrams_to_target += sent
                flow.bytes_to_target += sum(map(len, payloads)) - failed_bytes
                self._forwarded += sent
        self._pending.clear()

    def _admit(self, size: int, sender: Sender) -> None:
        """The slow path: parse, find or open the flow, cache its header, queue the payload.

        Raises RefusedError and HeaderError.
        """
        view = self._view[:size]
        if self._first_only and not (
            size >= len(V2_SIGNATURE) and self._buffer.startswith(V2_SIGNATURE)
        ):
            flow = self._latest.get(sender)
            if flow is None:
                raise RefusedError(
                    Refusal.NO_FLOW,
                    "datagram without a PROXY header and no flow from its sender",
                    "--udp-header first: the flow's first datagram must carry the header",
                )
            self._queue(flow, bytes(view))
            return
        route, consumed = self._shared.route_of(view, sender)
        flow = self.flows.get(route[0]) or self._open(route, sender)
        if consumed <= CACHED_HEADER and len(flow.headers) < HEADERS_PER_FLOW:
            header = (sender, bytes(view[:consumed]))
            if header not in self.routes:
                self.routes[header] = flow
                flow.headers.append(header)
        if self._first_only:
            self._latest[sender] = flow
            if consumed == size:  # a header-only datagram announces the flow
                flow.last_in = self.loop.now
                return
        self._queue(flow, bytes(view[consumed:]))

    # ------------------------------------------------------------------ flows

    def _open(self, route: Route, sender: Sender) -> Flow:
        key, client, target = route
        shared = self._shared
        if not shared.budget.take():
            self._flow_limit()
        try:
            conn_up = upstream.open_datagram(client, target, mark=shared.config.mark)
        except OSError as error:
            shared.budget.give_back()
            if isinstance(error, PermissionError):
                raise RefusedError(
                    Refusal.UPSTREAM_FAILED,
                    "cannot impersonate the client (IP_TRANSPARENT needs CAP_NET_ADMIN)",
                    error.strerror or str(error),
                ) from error
            raise RefusedError(
                Refusal.UPSTREAM_FAILED,
                "cannot open the upstream socket",
                error.strerror or str(error),
            ) from error
        log = shared.flow_log
        if log.failures:
            balancer = host_port(sender[0], sender[1])
            log = log.bind(
                **{
                    logs.REMOTE_ADDR: balancer,
                    logs.DOWNSTREAM_ADDR: balancer,  # go-mmproxy's name for it in UDP mode
                    logs.CLIENT_ADDR: host_port(*conn_up.source)
                    if client is not None
                    else logs.UNKNOWN_CLIENT,
                    logs.TARGET_ADDR: str(target),
                    logs.LISTENER_NUM: self.number,
                }
            )
        now = self.loop.now
        flow = Flow(key, conn_up.sock, self.sock, sender, log, now)
        self.flows[key] = flow
        if not math.isinf(self._close_after):
            due = now + self._close_after
            heapq.heappush(self._deadlines, (due, next(self._order), flow))
            self.loop.timer_by(due)
        self.replies.add(flow)
        self.counts["flowsOpened"] += 1
        shared.metrics.udp_flow_opened()
        if conn_up.fallback:
            log.notice("client port in use here: the flow uses an ephemeral port instead")
        log.state(logs.MSG_NEW_CONNECTION)
        return flow

    def _flow_limit(self) -> None:
        suppressed = self._shared.full.ready()
        if suppressed is not None:
            self.log.warning(
                "UDP flow limit reached: dropping datagrams that would open new flows",
                extra={"maxUdpFlows": self._shared.budget.capacity, "suppressed": suppressed},
            )
        raise RefusedError(Refusal.FLOW_LIMIT, "UDP flow limit reached")

    def _forget(self, flow: Flow) -> None:
        """No datagram goes to ``flow`` from now on (it is about to be retired)."""
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        for header in flow.headers:
            if self.routes.get(header) is flow:
                del self.routes[header]
        if self._latest.get(flow.sender) is flow:
            del self._latest[flow.sender]

    def _tick(self, now: float) -> float | None:
        """The loop's timer: retire the flows idle for ``-close-after``; the next deadline."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            flow = heap[0][2]
            if self.flows.get(flow.key) is not flow:  # already gone
                heapq.heappop(heap)
                continue
            last = flow.last_activity
            if now - last < self._close_after:
                heapq.heapreplace(heap, (last + self._close_after, next(self._order), flow))
                continue
            heapq.heappop(heap)
            self._forget(flow)
            self.replies.retire(flow, "idle")
        if now >= self._next_check:
            self._check_drops()
            self.loop.spin.allowed = self._moved <= POLLING_FLOWS
            self._moved, self._count_from = 0, now
            self._next_check = now + DROP_CHECK
        return min(heap[0][0], self._next_check) if heap else self._next_check

    # ------------------------------------------------------------------ drops

    def _check_drops(self) -> None:
        """Count and log what the kernel dropped at the listening socket since the last look."""
        total = kernel_drops(self.sock)
        if total is None or total <= self._kernel_drops:
            return
        new, self._kernel_drops = total - self._kernel_drops, total
        self.counts[f"dropped.{Refusal.RECEIVE_BUFFER_FULL}"] += new
        self._shared.metrics.udp_dropped(Refusal.RECEIVE_BUFFER_FULL, new)
        suppressed = self._shared.dropping.ready()
        if suppressed is not None:
            self.log.warning(
                "the kernel dropped datagrams: the listening socket's receive queue was full",
                extra={logs.LISTENER_NUM: self.number, "dropped": new, "suppressed": suppressed},
            )

    def _dropped(
        self, reason: str, message: str, detail: object, sender: Sender, count: int = 1
    ) -> None:
        self.counts[f"dropped.{reason}"] += count
        self._shared.metrics.udp_dropped(reason, count)
        log = self._shared.flow_log
        if log.failures:
            detail_text = str(detail)
            log.drop(
                logs.udp_drop_message(reason),
                f"{message}: {detail_text}" if detail_text else message,
                **{
                    logs.REMOTE_ADDR: host_port(sender[0], sender[1]),
                    logs.LISTENER_NUM: self.number,
                    logs.REASON: reason,
                },
            )

    def _warn_resource(self, error: OSError) -> None:
        suppressed = self._throttle.ready()
        if suppressed is not None:
            self.log.warning(
                "reading a datagram failed",
                extra={
                    logs.LISTENER_NUM: self.number,
                    logs.ERROR: error.strerror or str(error),
                    "suppressed": suppressed,
                },
            )
