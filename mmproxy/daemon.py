"""The daemon: owns listeners, connections and signals.

The relay itself (listeners, admission, the splice pump, graceful stop) lands
with the TCP daemon issue.  Until then :func:`run` says so plainly and fails,
so nobody mistakes a configuration check for a working proxy.
"""

from __future__ import annotations

import logging

from mmproxy.config import Config


def run(config: Config, log: logging.Logger) -> int:
    """Serve until told to stop; return the process exit code."""
    log.error(
        "the relay is not part of this build yet: only the configuration was checked",
        extra={"protocol": config.protocol},
    )
    return 1
