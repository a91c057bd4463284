"""The header stage of a TCP connection: read the PROXY header, check it, connect upstream.

Functions over one client socket and the configuration, with no state of their own; the
connection (:mod:`mmproxy.connection`) owns the socket, the buffer and the deadline, and
decides whether to wait for more.  Every refusal is a :class:`~mmproxy.errors.RefusedError`
or a :class:`~mmproxy.errors.HeaderError` with its reason code.
"""

from __future__ import annotations

import socket

from mmproxy import policy, upstream
from mmproxy.config import Config
from mmproxy.errors import HeaderError, Reason, Refusal, RefusedError
from mmproxy.header import IPAddress
from mmproxy.protocol import Command, NeedMore, ProxyHeader, Transport, parse

# A header is at most 16 + 65535 bytes (v2); one recv asks for what the parser
# still needs, or this much, whichever is more, and never waits for more.
RECV_SIZE = 16384


def read_header(sock: socket.socket, buffer: bytearray) -> tuple[ProxyHeader, bytes] | None:
    """The header in ``buffer`` (read on from ``sock``) and the bytes after it; None when
    the header is not complete and nothing more has arrived.

    Reads only what has arrived: the socket stays blocking for splice, each read is
    ``MSG_DONTWAIT``.  Raises HeaderError for a bad header or a peer that closed.
    """
    size = RECV_SIZE
    while True:
        if buffer:  # nothing to parse before the first read (an empty buffer needs more)
            result = parse(buffer)
            if not isinstance(result, NeedMore):
                return result.header, bytes(buffer[result.consumed :])
            size = max(result.at_least, RECV_SIZE)
        try:
            chunk = sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not chunk:
            raise HeaderError(
                Reason.INCOMPLETE, f"peer closed the connection after {len(buffer)} bytes"
            )
        buffer += chunk


def check_transport(header: ProxyHeader) -> None:
    """A TCP listener takes STREAM headers (and LOCAL ones, whatever they announce)."""
    if header.transport == Transport.DGRAM and header.command == Command.PROXY:
        raise RefusedError(
            Refusal.WRONG_TRANSPORT,
            "wrong transport in PROXY header",
            "the header announces DGRAM (UDP) on a TCP listener",
        )


def header_timeout(received: int, timeout: float) -> RefusedError:
    return RefusedError(
        Refusal.HEADER_TIMEOUT,
        "PROXY header timeout",
        f"no complete header within {timeout:g}s ({received} bytes received)",
    )


def connect(
    header: ProxyHeader,
    balancer: IPAddress,
    config: Config,
    destinations: policy.Destinations | None,
) -> upstream.Connecting:
    """Start the upstream connect for ``header``, from the client's address when it has one.

    Never waits for the backend (:func:`connected` does).  Raises the policy's refusals,
    and ``upstream_failed`` when the connect fails at once.
    """
    timeout = config.connect_timeout
    route = policy.decide(header, balancer, config, destinations)
    try:
        if route.source is None:  # LOCAL, UNKNOWN, UNSPEC, AF_UNIX: none to impersonate
            return upstream.connect_plain(route.target, mark=config.mark, timeout=timeout)
        return upstream.connect_spoofed(
            route.source, route.target, mark=config.mark, timeout=timeout
        )
    except OSError as error:
        raise _upstream_failed(error) from error


def connected(connecting: upstream.Connecting) -> upstream.Upstream:
    """The upstream socket once its connect completed (waiting up to the connect timeout).

    Raises ``upstream_failed`` when it did not.
    """
    try:
        return connecting.finish()
    except OSError as error:
        raise _upstream_failed(error) from error


def _upstream_failed(error: OSError) -> RefusedError:
    if isinstance(error, PermissionError):
        return RefusedError(
            Refusal.UPSTREAM_FAILED,
            "cannot impersonate the client (IP_TRANSPARENT needs CAP_NET_ADMIN)",
            error.strerror or str(error),
        )
    return RefusedError(
        Refusal.UPSTREAM_FAILED, "cannot connect to the target", error.strerror or str(error)
    )
