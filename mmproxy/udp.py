"""UDP mode (``-p udp``): PROXY v2 datagrams, one upstream socket per flow.

Each listening socket has one dispatcher thread.  It reads a datagram, checks
the sender (the load balancer) against the allowed subnets, takes the v2
header off and hands the payload to the datagram's flow.

A flow is one client behind one balancer: its key is the balancer's address
and port, the client's address and port from the header, and the target.
(Keying by the balancer alone, as some peers do, mixes up two clients behind
one balancer.)  A flow owns a UDP socket bound with ``IP_TRANSPARENT`` to the
client's address, connected to the backend, and one pool worker that waits
for the backend's replies and sends each one, without a header, to the
balancer through the listening socket the flow's datagrams came in on.

Idle expiry needs no polling: the reply worker waits for the socket with a
timeout equal to the time left before the flow has been idle for
``-close-after`` seconds, and on waking closes the flow only if nothing
moved in either direction meanwhile.

``--udp-header first`` (Cloudflare Spectrum): only the first datagram of a
flow carries a header.  A datagram that does not start with the v2 signature
belongs to the flow most recently named by a header from the same balancer
address and port; with none alive it is dropped.

Descriptor ownership: the reply worker is the only closer of its flow's
socket, and closes it under the flow's lock after marking the flow closed;
the dispatcher sends under that lock and only while the flow is open, so a
send can never land on a closed (or reused) descriptor.  Lock order: the
table's lock, then a flow's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Hashable
from typing import Any

from mmproxy import logs, policy, upstream
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config, Endpoint, IPAddress
from mmproxy.errors import HeaderError, RefusedError
from mmproxy.listener import RESOURCE_ERRORS, STOPPED_ERRORS, ListenerThread, Throttle
from mmproxy.metrics import NO_METRICS, TO_CLIENT, TO_TARGET, Metrics
from mmproxy.pool import WorkerPool
from mmproxy.protocol import V2_FIXED_LENGTH, V2_SIGNATURE, ProxyHeader, Transport, parse_complete

# Room for the largest datagram (65,507 payload bytes over IPv4, 65,527 over
# IPv6), so nothing is ever truncated.
DATAGRAM_BUFFER = 65536
ROUTE_CACHE = 65536  # (sender, header bytes) -> route entries kept before starting afresh
REPLY_BATCH = 64  # replies sent per wake-up before the expiry clock is looked at again
AFTER_ABORT_WAIT = 5.0  # seconds flows get to unwind at stop
SPARE_WORKERS = 16  # for workers between a finished flow and the idle stack

# Log ``reason`` codes (and counter names) for dropped datagrams that are not
# header parse errors.
NOT_ALLOWED = "not_allowed"
WRONG_VERSION = "wrong_version"
WRONG_TRANSPORT = "wrong_transport"
UPSTREAM_FAILED = "upstream_failed"
NO_FLOW = "no_flow"
FLOW_LIMIT = "flow_limit"
SEND_FAILED = "send_failed"

Sender = tuple[Any, ...]  # an address as recvfrom returns it: (host, port[, flowinfo, scope])
FlowKey = tuple[Sender, tuple[str, int] | None, Endpoint]
# A datagram's flow key, the address to impersonate (None: none) and the target.
Route = tuple[FlowKey, tuple[IPAddress, int] | None, Endpoint]


DroppedError = RefusedError  # a datagram that is not relayed: the same idea as for TCP


class Counters:
    """Named event counts shared by every thread (dispatchers and reply workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Flow:
    """One client behind one balancer: an upstream socket and its reply worker."""

    def __init__(
        self,
        key: FlowKey,
        conn_up: upstream.Upstream,
        listener: socket.socket,
        sender: Sender,
        log: logs.ConnectionLog,
    ) -> None:
        self.key = key
        self.sock = conn_up.sock
        self.listener = listener
        self.sender = sender
        self.log = log
        self.started = time.monotonic()
        self.last_activity = self.started
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = False
        # Written under the lock by dispatchers (to target) and by the reply
        # worker alone (to client).
        self.datagrams_to_target = 0
        self.bytes_to_target = 0
        self.datagrams_to_client = 0
        self.bytes_to_client = 0

    def send(self, payload: memoryview) -> bool:
        """Forward ``payload`` to the backend; False when the flow has closed meanwhile.

        Raises OSError when the send itself fails (the flow stays open).
        """
        with self._lock:
            if self._closed:
                return False
            self.last_activity = time.monotonic()
            self.sock.send(payload)
            self.datagrams_to_target += 1
            self.bytes_to_target += len(payload)
            return True

    def touch(self) -> bool:
        """Count activity without a payload (a header-only datagram); False when closed."""
        with self._lock:
            self.last_activity = time.monotonic()
            return not self._closed

    def abort(self) -> None:
        """Wake the reply worker so that it closes the flow (the daemon is stopping)."""
        with self._lock:
            self._stopping = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def close_if_idle(self, close_after: float) -> bool:
        """Mark the flow closed when idle for ``close_after`` seconds or stopping; True if so."""
        with self._lock:
            if self._closed:
                return True
            if not self._stopping and time.monotonic() - self.last_activity < close_after:
                return False
            self._closed = True
            return True

    def release(self) -> None:
        """Close the socket; only the reply worker calls this, after :meth:`close_if_idle`."""
        with self._lock:
            self._closed = True
            self.sock.close()

    @property
    def stopping(self) -> bool:
        # Read without the lock, once per reply: a plain attribute read cannot tear, and
        # a stale False only delays the worker's exit to its next wake-up (abort() wakes it).
        return self._stopping


class FlowTable:
    """The live flows, capped, and (for ``--udp-header first``) each sender's latest flow."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._changed = threading.Condition(threading.Lock())
        self._flows: dict[FlowKey, Flow] = {}
        self._latest: dict[Hashable, Flow] = {}

    def get(self, key: FlowKey) -> Flow | None:
        # Without the lock (once per datagram): dict.get is atomic, with or without the
        # GIL.  A flow that is being forgotten meanwhile refuses the send (it is closed)
        # and the caller opens a new one.
        return self._flows.get(key)

    def add(self, flow: Flow) -> Flow | None:
        """Register ``flow``; returns the flow already there under its key, or None.

        Raises :class:`DroppedError` when the table is full.
        """
        with self._changed:
            existing = self._flows.get(flow.key)
            if existing is not None:
                return existing
            if len(self._flows) >= self.capacity:
                raise DroppedError(FLOW_LIMIT, "UDP flow limit reached")
            self._flows[flow.key] = flow
            return None

    def set_latest(self, sender: Sender, flow: Flow) -> None:
        with self._changed:
            if self._flows.get(flow.key) is flow:
                self._latest[sender] = flow

    def latest(self, sender: Sender) -> Flow | None:
        with self._changed:
            return self._latest.get(sender)

    def expire(self, flow: Flow, close_after: float) -> bool:
        """Forget ``flow`` if it is idle (or stopping); True when it is gone."""
        with self._changed:
            if not flow.close_if_idle(close_after):
                return False
            self._forget(flow)
            return True

    def remove(self, flow: Flow) -> None:
        with self._changed:
            self._forget(flow)

    def _forget(self, flow: Flow) -> None:
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        if self._latest.get(flow.sender) is flow:
            del self._latest[flow.sender]
        if not self._flows:
            self._changed.notify_all()

    def __len__(self) -> int:
        with self._changed:
            return len(self._flows)

    def abort_all(self) -> int:
        with self._changed:
            flows = list(self._flows.values())
        for flow in flows:
            flow.abort()
        return len(flows)

    def wait_empty(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._flows, timeout)


class UdpServer:
    """UDP listeners, their dispatchers, and the flows they open."""

    def __init__(
        self,
        config: Config,
        log: logging.Logger,
        sockets: list[socket.socket],
        capacity: int,
        allow_list: AllowListHolder,
        metrics: Metrics = NO_METRICS,
        destinations: policy.Destinations | None = None,
    ) -> None:
        self._config = config
        self._allow_list = allow_list
        self._metrics = metrics
        self.log = log
        self._flow_log = logs.ConnectionLog(log, config.verbose)
        self._pool = WorkerPool(max_workers=capacity + SPARE_WORKERS)  # a reply worker per flow
        self._table = FlowTable(capacity)
        self.counters = Counters()  # events of the reply workers and the flows' totals
        self._sockets = sockets
        self._dispatchers = [Dispatcher(sock, number, self) for number, sock in enumerate(sockets)]
        self._full = Throttle(10.0)
        self._close_after = float(config.close_after) if config.close_after else math.inf
        self._destinations = destinations

    @property
    def capacity(self) -> int:
        return self._table.capacity

    def start(self) -> None:
        for dispatcher in self._dispatchers:
            dispatcher.start("udp")

    def stop(self, cause: str) -> None:
        """Stop reading, close every flow, report the totals."""
        self.log.info(
            "stopping: no longer reading datagrams, closing flows",
            extra={"signal": cause, "liveFlows": len(self._table)},
        )
        for dispatcher in self._dispatchers:
            dispatcher.stop()
        self._table.abort_all()
        if not self._table.wait_empty(AFTER_ABORT_WAIT):
            self.log.warning(
                "some UDP flows did not close in time", extra={"liveFlows": len(self._table)}
            )
        self._pool.close(timeout=1.0)
        for sock in self._sockets:
            sock.close()
        totals = Counter(self.counters.snapshot())
        for dispatcher in self._dispatchers:  # joined: their counts are final
            totals.update(dispatcher.counts)
        self.log.info("udp totals", extra=dict(sorted(totals.items())))
        self.log.info("stopped")

    # ------------------------------------------------------------ dispatching

    def handle(self, datagram: memoryview, sender: Sender, dispatcher: Dispatcher) -> None:
        """Runs on a dispatcher thread: deliver one datagram or drop it with a reason."""
        counts = dispatcher.counts
        counts["received"] += 1
        try:
            forwarded = self._deliver(datagram, sender, dispatcher)
        except DroppedError as drop:
            self._dropped(drop.reason, drop.message, drop.detail, sender, dispatcher)
        except HeaderError as error:
            self._dropped(error.reason.value, "invalid PROXY header", error, sender, dispatcher)
        else:
            if forwarded:
                counts["forwarded"] += 1
                self._metrics.udp_datagram(TO_TARGET)

    def _deliver(self, datagram: memoryview, sender: Sender, dispatcher: Dispatcher) -> bool:
        """Send the datagram's payload on its flow; False for a header-only announcement."""
        if not self._allow_list.current.allows(sender[0]):
            raise DroppedError(NOT_ALLOWED, "peer is not in the allowed subnets")
        first_only = self._config.udp_header == "first"
        if datagram[: len(V2_SIGNATURE)] != V2_SIGNATURE and first_only:
            flow = self._table.latest(sender)
            if flow is None or not self._send(flow, datagram):
                raise DroppedError(
                    NO_FLOW,
                    "datagram without a PROXY header and no flow from its sender",
                    "--udp-header first: the flow's first datagram must carry the header",
                )
            return True
        route, consumed = self._route_of(datagram, sender, dispatcher)
        key, client, target = route
        payload = datagram[consumed:]
        for _attempt in range(2):  # a flow may expire between the lookup and the send
            flow = self._table.get(key) or self._open(key, client, target, sender, dispatcher)
            if first_only:
                self._table.set_latest(sender, flow)
                if not payload:  # a header-only datagram announces the flow
                    if flow.touch():
                        return False
                    continue
            if self._send(flow, payload):
                return True
        raise DroppedError(NO_FLOW, "the datagram's flow closed while it was being delivered")

    def _route_of(
        self, datagram: memoryview, sender: Sender, dispatcher: Dispatcher
    ) -> tuple[Route, int]:
        """The datagram's route and its header's length.

        A flow's datagrams all carry the same header bytes, so the route is
        remembered in the dispatcher's ``routes`` by (sender, header bytes): the
        parse and its checks run once per flow, not once per datagram.  (The
        allowed subnets are not part of a route: they are checked for every
        datagram.)
        """
        routes = dispatcher.routes
        end = -1
        if self._destinations is not None:  # a reload or an address change: decide afresh
            generation = self._destinations.generation()
            if generation != dispatcher.generation:
                routes.clear()
                dispatcher.generation = generation
        if len(datagram) >= V2_FIXED_LENGTH and datagram[: len(V2_SIGNATURE)] == V2_SIGNATURE:
            end = V2_FIXED_LENGTH + int.from_bytes(datagram[14:16], "big")
            if end <= len(datagram):
                route = routes.get((sender, bytes(datagram[:end])))
                if route is not None:
                    return route, end
        parsed = parse_complete(datagram)
        header = parsed.header
        if header.version == 1:
            raise DroppedError(
                WRONG_VERSION, "PROXY v1 header on a UDP listener", "UDP needs PROXY v2"
            )
        if header.transport == Transport.STREAM:
            raise DroppedError(
                WRONG_TRANSPORT,
                "wrong transport in PROXY header",
                "the header announces STREAM (TCP) on a UDP listener",
            )
        route = self._route(header, sender)
        if len(routes) >= ROUTE_CACHE:
            routes.clear()  # rare: more live (sender, client) pairs than this
        routes[(sender, bytes(datagram[: parsed.consumed]))] = route
        return route, parsed.consumed

    def _route(self, header: ProxyHeader, sender: Sender) -> Route:
        """The flow key, the address to impersonate (None: none) and the target."""
        peer = ipaddress.ip_address(str(sender[0]).partition("%")[0])
        route = policy.decide(header, peer, self._config, self._destinations)
        source = route.source
        key_client = None if source is None else (str(source[0]), source[1])
        return (sender, key_client, route.target), source, route.target

    def _open(
        self,
        key: FlowKey,
        client: tuple[IPAddress, int] | None,
        target: Endpoint,
        sender: Sender,
        dispatcher: Dispatcher,
    ) -> Flow:
        if len(self._table) >= self._table.capacity:
            self._flow_limit()
        try:
            conn_up = upstream.open_datagram(client, target, mark=self._config.mark)
        except PermissionError as error:
            raise DroppedError(
                UPSTREAM_FAILED,
                "cannot impersonate the client (IP_TRANSPARENT needs CAP_NET_ADMIN)",
                error.strerror or str(error),
            ) from error
        except OSError as error:
            raise DroppedError(
                UPSTREAM_FAILED, "cannot open the upstream socket", error.strerror or str(error)
            ) from error
        log = self._flow_log
        if log.failures:
            log = log.bind(
                **{
                    logs.REMOTE_ADDR: logs.go_address(str(sender[0]), int(sender[1])),
                    logs.CLIENT_ADDR: logs.go_address(*conn_up.source),
                    logs.TARGET_ADDR: str(target),
                    logs.LISTENER_NUM: dispatcher.number,
                }
            )
        flow = Flow(key, conn_up, dispatcher.sock, sender, log)
        try:
            existing = self._table.add(flow)
        except DroppedError:
            conn_up.sock.close()
            self._flow_limit()
            raise
        if existing is not None:  # another dispatcher opened it meanwhile
            conn_up.sock.close()
            return existing
        try:
            self._pool.submit(lambda: self._serve_replies(flow))
        except (RuntimeError, OSError) as error:
            self._table.remove(flow)
            flow.release()
            raise DroppedError(UPSTREAM_FAILED, "no thread for the flow", str(error)) from error
        self.counters.add("flowsOpened")
        self._metrics.udp_flow_opened()
        if conn_up.fallback:
            log.notice("client port in use here: the flow uses an ephemeral port instead")
        log.state("flow started")
        return flow

    def _flow_limit(self) -> None:
        suppressed = self._full.ready()
        if suppressed is not None:
            self.log.warning(
                "UDP flow limit reached: dropping datagrams that would open new flows",
                extra={"maxUdpFlows": self._table.capacity, "suppressed": suppressed},
            )
        raise DroppedError(FLOW_LIMIT, "UDP flow limit reached")

    def _send(self, flow: Flow, payload: memoryview) -> bool:
        try:
            sent = flow.send(payload)
        except OSError as error:
            # ECONNREFUSED: an earlier datagram found no backend listening (ICMP).
            raise DroppedError(
                SEND_FAILED, "cannot send the datagram to the target", error.strerror or str(error)
            ) from error
        return sent

    def _dropped(
        self, reason: str, message: str, detail: object, sender: Sender, dispatcher: Dispatcher
    ) -> None:
        dispatcher.counts[f"dropped.{reason}"] += 1
        self._metrics.udp_dropped(reason)
        log = self._flow_log
        if log.failures:
            log.drop(
                message,
                detail if isinstance(detail, BaseException) else (str(detail) or None),
                **{
                    logs.REMOTE_ADDR: logs.go_address(str(sender[0]), int(sender[1])),
                    logs.LISTENER_NUM: dispatcher.number,
                    logs.REASON: reason,
                },
            )

    # ------------------------------------------------------------ replies

    def _serve_replies(self, flow: Flow) -> None:
        """A flow's reply worker: backend -> balancer until the flow expires or stops."""
        close_after = self._close_after
        poller = select.poll()
        poller.register(flow.sock, select.POLLIN)
        reason = "idle"
        try:
            while True:
                wait = flow.last_activity + close_after - time.monotonic()
                if wait <= 0 or flow.stopping:
                    if self._table.expire(flow, close_after):
                        reason = "stopping" if flow.stopping else "idle"
                        break
                    continue
                timeout_ms = None if math.isinf(wait) else max(1, math.ceil(wait * 1000))
                if poller.poll(timeout_ms):
                    self._relay_replies(flow)
        except Exception as error:  # noqa: BLE001 - the flow must end cleanly whatever happens
            reason = "error"
            self._table.remove(flow)
            flow.log.failure("UDP flow ended with an error", error)
        finally:
            flow.release()
            self._flow_ended(flow, reason)

    def _relay_replies(self, flow: Flow) -> None:
        """Send what the backend has queued (a bounded batch) to the balancer."""
        for _ in range(REPLY_BATCH):
            if flow.stopping:
                return
            try:
                data = flow.sock.recv(DATAGRAM_BUFFER, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # An earlier datagram to the backend got "port unreachable" back.
                self.counters.add(f"dropped.{SEND_FAILED}")
                continue
            # Without the flow's lock: a float attribute store is atomic with or without the
            # GIL, and dispatchers only ever store "now" there too, so any order is right.
            flow.last_activity = time.monotonic()
            try:
                flow.listener.sendto(data, flow.sender)
            except OSError as error:
                self.counters.add("dropped.reply_failed")
                flow.log.drop("cannot send a reply to the load balancer", error)
                continue
            flow.datagrams_to_client += 1
            flow.bytes_to_client += len(data)
            self._metrics.udp_datagram(TO_CLIENT)

    def _flow_ended(self, flow: Flow, reason: str) -> None:
        self.counters.add("flowsClosed")
        self.counters.add("replies", flow.datagrams_to_client)
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


class Dispatcher(ListenerThread):
    """Reads datagrams from one listening UDP socket and hands each to the server.

    Its stop shuts down reading only: flows still send replies through the socket until
    the server closes it.
    """

    SHUTDOWN = socket.SHUT_RD
    THREAD_NAME = "mmproxy-udp"

    def __init__(self, sock: socket.socket, number: int, server: UdpServer) -> None:
        super().__init__(sock, number, server.log)
        self._server = server
        # What this thread received, forwarded and dropped; only it writes here, and the
        # server reads the counts after joining it.
        self.counts: Counter[str] = Counter()
        # Its cache of parsed headers (see UdpServer._route_of): one per thread, so that
        # the check-then-clear needs no lock, with or without the GIL.
        self.routes: dict[tuple[Sender, bytes], Route] = {}
        self.generation: tuple[int, int] | None = None  # of the destinations the routes saw

    def _loop(self) -> None:
        buffer = bytearray(DATAGRAM_BUFFER)
        view = memoryview(buffer)
        while not self.stopping.is_set():
            try:
                size, sender = self.sock.recvfrom_into(buffer)
            except OSError as error:
                if self.stopping.is_set() or error.errno in STOPPED_ERRORS:
                    return
                if error.errno in RESOURCE_ERRORS:
                    self._pause_after(
                        error, "reading a datagram failed; pausing before the next try"
                    )
                continue  # e.g. ECONNREFUSED from an ICMP error about an earlier reply
            if self.stopping.is_set():
                return
            try:
                self._server.handle(view[:size], sender, self)
            except Exception:
                self.log.exception("handling a datagram failed")
