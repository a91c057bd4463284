"""systemd's readiness protocol (``Type=notify``), in a few lines of stdlib code.

systemd passes the path of a datagram socket in ``$NOTIFY_SOCKET``; the service
sends newline-separated ``KEY=VALUE`` assignments to it: ``READY=1`` once it
serves, ``STOPPING=1`` when it begins to shut down, ``STATUS=...`` for
``systemctl status``.  A name starting with ``@`` is in the abstract namespace
(a leading NUL byte on the wire).  Without the variable nothing is sent, so
the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

READY = "READY=1"
STOPPING = "STOPPING=1"


def notify_socket(environ: Mapping[str, str] | None = None) -> str | None:
    """The address ``$NOTIFY_SOCKET`` names, ready for ``connect``; None when unset or unusable.

    Only path and abstract (``@``) names are understood; systemd also knows
    ``vsock:`` addresses, for virtual machines, which mmproxy has no use for.
    """
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) in one datagram.

    Returns False when there is no notification socket (not run by systemd),
    True once sent.  Raises OSError when the socket is named but the datagram
    cannot be delivered; the caller decides whether that matters.
    """
    address = notify_socket(environ)
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)
    return True


WATCHDOG = "WATCHDOG=1"


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd asks for none.

    systemd sets ``$WATCHDOG_USEC`` from the unit's ``WatchdogSec=`` (and
    ``$WATCHDOG_PID`` to the process it means); pinging at half that period, as
    sd_watchdog_enabled(3) advises, leaves room for one late wake-up.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
