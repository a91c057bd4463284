"""UDP mode (``-p udp``): PROXY v2 datagrams, one upstream socket per flow, no thread per flow.

A flow is one client behind one balancer: its key is the balancer's address and port, the
client's address and port from the header, and the target.  (Keying by the balancer alone,
as some peers do, mixes up two clients behind one balancer.)  A flow owns a UDP socket bound
with ``IP_TRANSPARENT`` to the client's address and connected to the backend
(:mod:`mmproxy.flows`); the backend's replies go, without a header, to the balancer through
the listening socket the flow's datagrams came in on.

Threads: each listening socket has a dispatcher on an event loop and thread of its own
(:mod:`mmproxy.dispatch`), which also serves its flows' replies: a server has one thread per
listener, however many flows are open.  ``-listeners N`` spreads the balancers' ports over N
sockets (``SO_REUSEPORT``), so N threads; on a free-threaded build they run in parallel.

``--udp-header first`` (Cloudflare Spectrum): only the first datagram of a flow carries a
header.  A datagram that does not start with the v2 signature belongs to the flow most
recently named by a header from the same balancer address and port; with none alive it is
dropped.

This module chooses a datagram's route (the parse and its checks) and holds the dispatchers
on the shared server base (:mod:`mmproxy.server`): start, stop, totals.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable, Sequence

from mmproxy import logs, policy
from mmproxy.acl import AllowListHolder
from mmproxy.config import Config
from mmproxy.dispatch import Dispatcher, Shared
from mmproxy.errors import Refusal, RefusedError
from mmproxy.flows import FlowBudget, Route, Sender
from mmproxy.listener import Throttle, listener_fields
from mmproxy.metrics import NO_METRICS, Metrics
from mmproxy.protocol import ProxyHeader, Transport, parse_complete
from mmproxy.server import Server, Serving


class UdpServer(Server):
    """UDP listeners, their dispatchers, and the flows they open."""

    protocol = "udp"
    relays = "datagrams"

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
        super().__init__(config, log, sockets, allow_list, metrics, destinations)
        self._budget = FlowBudget(capacity)
        shared = Shared(
            config=config,
            log=log,
            flow_log=logs.ConnectionLog(log, config.verbose, listener_fields(config, sockets)),
            allow_list=allow_list,
            metrics=metrics,
            budget=self._budget,
            route_of=self._route_of,
            destinations=destinations,
            full=Throttle(10.0),
            dropping=Throttle(10.0),
        )
        self._dispatchers = [
            Dispatcher(sock, number, shared) for number, sock in enumerate(sockets)
        ]

    @property
    def capacity(self) -> int:
        return self._budget.capacity

    def live(self) -> int:
        return len(self._budget)

    @property
    def open_flows(self) -> int:
        return self.live()

    def _serving(self) -> Sequence[Serving]:
        return self._dispatchers

    def _start_services(self) -> None:
        pass  # each dispatcher's loop is all it needs, started with its thread

    def _stop_admitting(self) -> None:
        pass  # a dispatcher stops reading and closes its flows in one step (_wind_down)

    def _stopping_status(self) -> str:
        return "closing UDP flows"

    def _wind_down(self, cause: str, interrupted: Callable[[], bool]) -> None:
        """Stop reading and close every flow at once (a flow has no end to wait for)."""
        self._log.info(
            "stopping: no longer reading datagrams, closing flows",
            extra={"signal": cause, "liveFlows": self.live()},
        )
        totals: Counter[str] = Counter()
        for dispatcher in self._dispatchers:
            dispatcher.stop()  # its loops have ended: its counts are final
            totals.update(dispatcher.counts)
            totals.update(dispatcher.replies.counts)
        for sock in self._sockets:
            sock.close()
        totals.setdefault("received", 0)
        totals.setdefault("forwarded", 0)
        self._log.info("udp totals", extra=dict(sorted(totals.items())))

    # ------------------------------------------------------------ routes

    def _route_of(self, datagram: memoryview, sender: Sender) -> tuple[Route, int]:
        """The datagram's route and its header's length (a dispatcher's slow path).

        A dispatcher caches the result by header bytes once the flow is open, so the parse
        and its checks run about once per flow.  (The allowed subnets are not part of a
        route: they are checked for every datagram.)
        """
        parsed = parse_complete(datagram)
        header = parsed.header
        if header.version == 1:
            raise RefusedError(
                Refusal.WRONG_VERSION, "PROXY v1 header on a UDP listener", "UDP needs PROXY v2"
            )
        if header.transport == Transport.STREAM:
            raise RefusedError(
                Refusal.WRONG_TRANSPORT,
                "wrong transport in PROXY header",
                "the header announces STREAM (TCP) on a UDP listener",
            )
        return self._route(header, sender), parsed.consumed

    def _route(self, header: ProxyHeader, sender: Sender) -> Route:
        """The flow key, the address to impersonate (None: none) and the target."""
        peer = ipaddress.ip_address(str(sender[0]).partition("%")[0])
        route = policy.decide(header, peer, self._config, self._destinations)
        source = route.source
        key_client = None if source is None else (str(source[0]), source[1])
        return (sender, key_client, route.target), source, route.target
