"""What each workload runs (backend mode, client mode, connections) and the figures it yields.

The figures are computed here from the load generator's raw output and the proxy's resource
deltas, as pure functions, so that the arithmetic is tested apart from any measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.procs import Usage
from bench.stats import per

Figures = dict[str, float | None]


@dataclass(frozen=True)
class Metric:
    """One figure of a workload: its key in the JSON, its unit in the table."""

    key: str
    unit: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Workload:
    """One load shape.  ``conns`` None means the settings choose (the idle workloads).

    ``protocol`` is what the proxy relays: mmproxy gets ``-p udp`` for a UDP workload, and a
    peer's template gets it as ``{protocol}``.
    """

    name: str
    title: str
    server: str  # loadgen serve MODE
    client: str  # loadgen MODE
    kind: str  # bulk, messages, connections, idle, datagrams
    conns: int | None = None  # connections, or UDP flows
    limited: bool = False  # idle-limit: the proxy runs under the descriptor limit
    latency: bool = False  # also report p50/p99 (per message or per connection)
    protocol: str = "tcp"  # tcp or udp
    window: int = 64  # messages or datagrams in flight per connection or flow
    # idle kinds: seconds the connections stay quiet before the proxy's figures are read
    quiet: float = 0.0

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS[self.kind] + (LATENCY if self.latency else ())

    @property
    def cpu(self) -> Metric | None:
        """The proxy's CPU time per unit of work, or None where no work is done."""
        return CPU.get(self.kind)


METRICS: dict[str, tuple[Metric, ...]] = {
    "bulk": (Metric("gbps", "Gbit/s"),),
    "messages": (Metric("msgs_per_s", "msg/s"),),
    "connections": (Metric("conns_per_s", "conn/s"),),
    "datagrams": (
        Metric("dgrams_per_s", "dgram/s"),
        Metric("lost", "lost", higher_is_better=False),
    ),
    "idle": (
        Metric("held", "held"),
        Metric("rss_kib_per_conn", "RSS KiB/conn", higher_is_better=False),
        Metric("fds_per_conn", "fds/conn", higher_is_better=False),
        Metric("threads_per_conn", "threads/conn", higher_is_better=False),
    ),
}
LATENCY = (
    Metric("p50_ms", "p50 ms", higher_is_better=False),
    Metric("p99_ms", "p99 ms", higher_is_better=False),
)
CPU: dict[str, Metric] = {
    "bulk": Metric("cpu_s_per_gb", "CPU s/GB", higher_is_better=False),
    "messages": Metric("cpu_ms_per_1k_msg", "CPU ms/1k msg", higher_is_better=False),
    "connections": Metric("cpu_ms_per_1k_conn", "CPU ms/1k conn", higher_is_better=False),
    "datagrams": Metric("cpu_ms_per_1k_dgram", "CPU ms/1k dgram", higher_is_better=False),
}

STREAM_WINDOW = 64  # messages in flight per connection in the streaming workload
UDP_WINDOW = 16  # datagrams (64 bytes of payload each) in flight per UDP flow
# idle-active: how long its connections stay quiet before the proxy's figures are read.  It
# covers mmproxy's grace (1 s) and the retirement of the pool workers that served the burst
# (5 s idle): what is left then is what a quiet connection costs for as long as it stays.
QUIET_SECONDS = 10.0


def _udp_echo(name: str, flows: int, window: int) -> Workload:
    """Flows to a UDP echo backend, each keeping ``window`` datagrams in flight."""
    plural = "s" if flows > 1 else ""
    return Workload(
        name,
        f"UDP echo, {flows} flow{plural} x {window} in flight",
        "udp-echo",
        "udp",
        "datagrams",
        flows,
        latency=True,
        protocol="udp",
        window=window,
    )


WORKLOADS: tuple[Workload, ...] = (
    Workload("bulk-up-1", "bulk upload, 1 conn", "sink", "upload", "bulk", 1),
    Workload("bulk-up-8", "bulk upload, 8 conns", "sink", "upload", "bulk", 8),
    Workload("bulk-down-1", "bulk download, 1 conn", "source", "download", "bulk", 1),
    Workload("bulk-down-8", "bulk download, 8 conns", "source", "download", "bulk", 8),
    Workload(
        "pingpong", "PING ping-pong, 50 conns", "echo", "pingpong", "messages", 50, latency=True
    ),
    Workload(
        "stream", "PING streaming, 50 conns", "echo", "stream", "messages", 50, window=STREAM_WINDOW
    ),
    Workload(
        "connrate",
        "connect+request+close, 8 clients",
        "rr",
        "connrate",
        "connections",
        8,
        latency=True,
    ),
    Workload("idle", "idle connections", "hold", "idle", "idle"),
    Workload("idle-limit", "idle, proxy nofile limit", "hold", "idle", "idle", limited=True),
    Workload(
        "idle-active",
        "quiet after a request",
        "echo",
        "idle-active",
        "idle",
        quiet=QUIET_SECONDS,
    ),
    _udp_echo("udp", 50, UDP_WINDOW),
    _udp_echo("udp-1", 1, UDP_WINDOW),
    # Beside "udp": the same 50 flows with one datagram each in flight, where no proxy's
    # receive buffer overflows, so every proxy's median is of all its datagrams.
    _udp_echo("udp-50x1", 50, 1),
)
WORKLOADS += (
    Workload(
        "udp-idle",
        "idle UDP flows",
        "udp-echo",
        "udp-idle",
        "idle",
        protocol="udp",
        window=1,
    ),
)
NAMES: tuple[str, ...] = tuple(workload.name for workload in WORKLOADS)
BY_NAME: dict[str, Workload] = {workload.name: workload for workload in WORKLOADS}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def load_figures(workload: Workload, client: dict[str, Any], cpu_seconds: float | None) -> Figures:
    """The figures of a bulk, messages, connections or datagrams run from the client's output."""
    seconds = float(client["seconds"])
    if seconds <= 0:
        raise ValueError("the client measured no time")
    if workload.kind == "bulk":
        size = float(client["bytes"])
        return {
            "gbps": size * 8 / seconds / 1e9,
            "cpu_s_per_gb": per(cpu_seconds, size, 1e9),
        }
    if workload.kind == "messages":
        count = float(client["messages"])
        return {
            "msgs_per_s": count / seconds,
            "cpu_ms_per_1k_msg": per(_ms(cpu_seconds), count, 1e3),
            "p50_ms": float(client["p50_us"]) / 1e3 if client.get("samples") else None,
            "p99_ms": float(client["p99_us"]) / 1e3 if client.get("samples") else None,
        }
    if workload.kind == "connections":
        count = float(client["connections"])
        have = bool(client.get("samples"))
        return {
            "conns_per_s": count / seconds,
            "p50_ms": float(client["p50_us"]) / 1e3 if have else None,
            "p99_ms": float(client["p99_us"]) / 1e3 if have else None,
            "cpu_ms_per_1k_conn": per(_ms(cpu_seconds), count, 1e3),
        }
    if workload.kind == "datagrams":
        # the rate counts echoes received within the duration; the loss is every datagram
        # sent and never echoed, counted after the grace period at the end
        count = float(client["datagrams"])
        have = bool(client.get("samples"))
        return {
            "dgrams_per_s": count / seconds,
            "lost": float(client["lost"]),
            "p50_ms": float(client["p50_us"]) / 1e3 if have else None,
            "p99_ms": float(client["p99_us"]) / 1e3 if have else None,
            "cpu_ms_per_1k_dgram": per(_ms(cpu_seconds), count, 1e3),
        }
    raise ValueError(f"{workload.name} is not a load workload")


def client_header(workload: Workload, header: str, proxied: bool) -> str:
    """The PROXY header the load generator sends: ``none`` direct, always v2 for UDP
    (a v1 header has no datagram transport), else the ``--header`` setting."""
    if not proxied:
        return "none"
    return "v2" if workload.protocol == "udp" else header


def idle_figures(held: int, grown: Usage | None) -> Figures:
    """Idle figures: connections held, and what each cost the proxy (None for ``direct``)."""
    figures: Figures = {"held": float(held)}
    for key, amount in (
        ("rss_kib_per_conn", None if grown is None else grown.rss_kib),
        ("fds_per_conn", None if grown is None else grown.fds),
        ("threads_per_conn", None if grown is None else grown.threads),
    ):
        figures[key] = per(None if amount is None else float(amount), float(held))
    return figures
