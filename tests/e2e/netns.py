"""Network namespaces, in-namespace sockets and a recording backend for the e2e tests.

Why a namespace: mmproxy connects to the backend from the client's address (IP_TRANSPARENT),
and the replies only come back through policy routes (``ip rule ... table 123``).  Adding those
routes to the host would change how the machine routes, so every test runs in a namespace of its
own making, where the routes exist and nothing else does.

Why a helper thread: a network namespace belongs to a thread, not to a process, and a socket
stays in the namespace of the thread that created it.  :class:`NamespaceSockets` keeps one
thread that has entered the namespace and creates every socket there; the sockets are then used
from any thread (connect, send and receive do not care which thread calls them).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import random
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

CLONE_NEWNET = 0x40000000
# IP_TRANSPARENT for IPv4 (SOL_IP) and IPv6 (IPPROTO_IPV6); the socket module lacks them in 3.11.
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
ROUTING_TABLE = 123  # the README's convention for the "replies come back to mmproxy" table

_T = TypeVar("_T")
Peer = tuple[str, int]


class Deadline:
    """A point in time that every wait and loop checks, so none of them can run forever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end


# ------------------------------------------------------------------------ namespaces


def run_ip(*args: str) -> None:
    """Run one ``ip`` command; a failure raises with ip's own message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NetNamespace:
    """A named network namespace with loopback up and mmproxy's policy routes.

    The routes are the README's: packets from loopback addresses that come back in on ``lo``
    (the backend's replies to a spoofed client address) are delivered locally, to mmproxy's
    transparent upstream socket.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        self._created = False

    def create(self, *, routes: bool = True) -> None:
        """Make the namespace with loopback up, and the policy routes unless ``routes`` is False."""
        run_ip("netns", "add", self.name)
        self._created = True
        self.ip("link", "set", "lo", "up")
        if not routes:
            return
        table = str(ROUTING_TABLE)
        self.ip("rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", table)
        self.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", table)
        self.ip("-6", "rule", "add", "from", "::1/128", "iif", "lo", "table", table)
        self.ip("-6", "route", "add", "local", "::/0", "dev", "lo", "table", table)

    def ip(self, *args: str) -> None:
        """``ip -n NAME ARGS...``."""
        run_ip("-n", self.name, *args)

    def delete(self) -> None:
        if self._created:
            self._created = False
            run_ip("netns", "del", self.name)


def _enter_namespace(path: str) -> None:
    """Move the calling thread into the network namespace at ``path`` (Python 3.11: no setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NamespaceSockets:
    """Creates sockets inside a namespace, from one thread that lives there."""

    def __init__(self, namespace: NetNamespace) -> None:
        self.namespace = namespace
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{namespace.name}",
            initializer=_enter_namespace,
            initargs=(namespace.path,),
        )

    def call(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` in the namespace thread and return its result."""
        return self._executor.submit(function).result(timeout=30)

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        return self.call(lambda: socket.socket(family, kind))

    def server(self, host: str, port: int = 0, *, transparent: bool = False) -> socket.socket:
        """A listening TCP socket on ``host:port`` (port 0: the kernel picks one).

        ``transparent`` sets IP_TRANSPARENT, which lets the server answer from an address that
        is routed locally but configured on no interface (the ``-mark`` test's target).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def listen() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if transparent:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((host, port))
                sock.listen(512)
            except BaseException:
                sock.close()
                raise
            return sock

        return self.call(listen)

    def connect(self, address: Peer, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from inside the namespace (the connect runs in the caller's thread)."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = self.new_socket(family)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def transparent_connect(
        self, source: Peer, target: Peer, timeout: float = 10.0
    ) -> socket.socket:
        """Connect to ``target`` from the non-local ``source``, as mmproxy does upstream."""
        v6 = ":" in source[0]
        sock = self.new_socket(socket.AF_INET6 if v6 else socket.AF_INET)
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind(source)
            sock.settimeout(timeout)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class Net:
    """A namespace and the factory for sockets inside it (what the ``net`` fixture gives)."""

    ns: NetNamespace
    sockets: NamespaceSockets


@contextlib.contextmanager
def namespace(name: str, *, routes: bool = True) -> Iterator[tuple[NetNamespace, NamespaceSockets]]:
    """A fresh namespace and its socket factory, both gone when the block ends.

    ``routes=False`` leaves the policy routes out (loopback is up all the same).
    """
    ns = NetNamespace(name)
    try:
        ns.create(routes=routes)
        sockets = NamespaceSockets(ns)
        try:
            yield ns, sockets
        finally:
            sockets.close()
    finally:
        ns.delete()


# ------------------------------------------------------------------- client addresses


class ClientAddresses:
    """Hands out fake client addresses that no two connections of a session share.

    Reusing a source address:port towards the same backend could meet a TIME_WAIT from an
    earlier test, and then a failure would come from the test, not from mmproxy.  Hosts come
    from the documentation ranges only (RFC 5737, RFC 3849).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        base = random.randrange(20000, 30000)
        self._ports = itertools.count(base)

    def _next_port(self) -> int:
        with self._lock:
            port = next(self._ports)
        if port > 60000:
            raise RuntimeError("ran out of fake client ports")
        return port

    def v4(self, prefix: str = "198.51.100") -> Peer:
        port = self._next_port()
        return f"{prefix}.{1 + port % 250}", port

    def v6(self) -> Peer:
        port = self._next_port()
        return f"2001:db8::{1 + port % 250:x}", port


# ---------------------------------------------------------------------------- backend


@dataclass
class BackendConnection:
    """One connection the backend accepted: who it came from and what went through it."""

    sock: socket.socket
    peer: Peer
    local: Peer
    deadline: Deadline
    received: int = 0
    sent: int = 0
    head: bytearray = field(default_factory=bytearray)  # the first bytes received
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    eof: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    HEAD_LIMIT: ClassVar[int] = 65536

    def recv(self, size: int = 65536) -> bytes:
        """Receive once, counting and hashing; ``b""`` at EOF."""
        self.sock.settimeout(max(0.01, self.deadline.remaining()))
        data = self.sock.recv(size)
        if not data:
            self.eof = True
        self.received += len(data)
        self.digest.update(data)
        if len(self.head) < self.HEAD_LIMIT:
            self.head += data[: self.HEAD_LIMIT - len(self.head)]
        return data

    def recv_to_eof(self) -> None:
        """Receive until the peer's FIN; the deadline bounds it."""
        while not self.eof:
            self.recv()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(max(0.01, self.deadline.remaining()))
        self.sock.sendall(data)
        self.sent += len(data)

    def shut_wr(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)


Handler = Callable[[BackendConnection], None]


def echo(conn: BackendConnection) -> None:
    """Send back everything, then half-close once the client has."""
    while data := conn.recv():
        conn.send(data)
    conn.shut_wr()


def sink_then_digest(conn: BackendConnection) -> None:
    """Read to EOF, then answer with the sha256 of what arrived (32 bytes)."""
    conn.recv_to_eof()
    conn.send(conn.digest.digest())


def greet_then_echo(greeting: bytes) -> Handler:
    """Speak first (like SMTP or SSH servers), then echo."""

    def handler(conn: BackendConnection) -> None:
        conn.send(greeting)
        echo(conn)

    return handler


def sink_then_send(payload: bytes) -> Handler:
    """Read to EOF, then send ``payload`` and close."""

    def handler(conn: BackendConnection) -> None:
        conn.recv_to_eof()
        conn.send(payload)

    return handler


def send_then_sink(payload: bytes) -> Handler:
    """Send ``payload``, half-close at once, then keep reading to EOF."""

    def handler(conn: BackendConnection) -> None:
        conn.send(payload)
        conn.shut_wr()
        conn.recv_to_eof()

    return handler


LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def reset_after_first_read(conn: BackendConnection) -> None:
    """Read once, then abort the connection (RST) when the handler returns."""
    conn.recv()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)


class Backend:
    """A TCP server in the namespace that records every connection and runs a handler on it.

    ``handler`` may be changed between connections (tests set it before connecting).  Each
    connection gets its own thread, bounded by ``connection_timeout``; every socket is closed
    by :meth:`close`.
    """

    def __init__(
        self,
        sockets: NamespaceSockets,
        host: str,
        port: int = 0,
        handler: Handler = echo,
        connection_timeout: float = 60.0,
        *,
        transparent: bool = False,
    ) -> None:
        self.handler = handler
        self.connection_timeout = connection_timeout
        self.connections: list[BackendConnection] = []
        self._listener = sockets.server(host, port, transparent=transparent)
        self._listener.settimeout(0.05)
        self.address: Peer = self._listener.getsockname()[:2]
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"backend-{self.address}", daemon=True
        )
        self._acceptor.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def target(self) -> str:
        """The address in mmproxy's flag syntax: ``127.0.0.1:P`` or ``[::1]:P``."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn = BackendConnection(
                sock, peer[:2], sock.getsockname()[:2], Deadline(self.connection_timeout)
            )
            with self._lock:
                self.connections.append(conn)
                self._lock.notify_all()
            thread = threading.Thread(target=self._serve, args=(conn, self.handler), daemon=True)
            if len(self._threads) >= 1024:  # a finished thread's stack is freed once dropped
                self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: BackendConnection, handler: Handler) -> None:
        try:
            handler(conn)
        except OSError as error:  # a reset or a timeout: recorded for the test to judge
            conn.error = f"{type(error).__name__}: {error}"
        finally:
            conn.sock.close()
            conn.done.set()

    def peers(self) -> list[Peer]:
        with self._lock:
            return [c.peer for c in self.connections]

    def wait_connections(self, count: int, timeout: float = 10.0) -> list[BackendConnection]:
        """Wait until at least ``count`` connections arrived; return them all."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.connections) >= count, timeout)
            if len(self.connections) < count:
                raise AssertionError(
                    f"backend {self.address} saw {len(self.connections)} connections,"
                    f" expected {count} within {timeout}s"
                )
            return list(self.connections)

    def wait_done(self, timeout: float = 30.0) -> list[BackendConnection]:
        """Wait for every accepted connection's handler to finish."""
        deadline = Deadline(timeout)
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            if not conn.done.wait(deadline.remaining()):
                raise AssertionError(f"backend handler for {conn.peer} still running")
        return conns

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            if not conn.done.is_set():
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)


# ------------------------------------------------------------------------ client side


def recv_to_eof(sock: socket.socket, deadline: Deadline, limit: int = 64 << 20) -> bytes:
    """Everything the peer sends until its FIN (bounded by ``deadline`` and ``limit`` bytes)."""
    chunks = bytearray()
    while len(chunks) <= limit:
        sock.settimeout(max(0.01, deadline.remaining()))
        data = sock.recv(1 << 20)
        if not data:
            return bytes(chunks)
        chunks += data
    raise AssertionError(f"peer sent more than {limit} bytes")


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes (FIN or RST), reading and dropping anything it sends.

    Raises AssertionError if it is still open after ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = Deadline(timeout)
    while not deadline.expired():
        sock.settimeout(max(0.01, deadline.remaining()))
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            break
    raise AssertionError(f"connection still open after {timeout}s")


def exchange(sock: socket.socket, payload: bytes, deadline: Deadline) -> bytes:
    """Send ``payload`` then half-close, while reading everything the peer sends until EOF.

    Sending and receiving are interleaved, so an echoing peer cannot deadlock the two of us
    when the payload is larger than the socket buffers along the way.
    """
    received = bytearray()
    view = memoryview(payload)
    sent = 0
    if not payload:
        sock.shutdown(socket.SHUT_WR)
    sock.setblocking(False)
    try:
        with selectors.DefaultSelector() as selector:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if payload else 0)
            selector.register(sock, events)
            while not deadline.expired():
                for _, mask in selector.select(min(0.5, deadline.remaining())):
                    if mask & selectors.EVENT_WRITE:
                        sent += sock.send(view[sent : sent + 262144])
                        if sent == len(payload):
                            sock.shutdown(socket.SHUT_WR)
                            selector.modify(sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        data = sock.recv(1 << 20)
                        if not data:
                            if sent < len(payload):
                                raise AssertionError(f"EOF after sending {sent}/{len(payload)}")
                            return bytes(received)
                        received += data
    finally:
        view.release()
    raise AssertionError(f"exchange unfinished: sent {sent}/{len(payload)}, got {len(received)}")


def accept_queue(ns: NetNamespace, port: int) -> int:
    """Connections the kernel has completed on a TCP listener in ``ns`` that wait for accept()
    (``ss``'s Recv-Q of the listening socket)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns.name, "ss", "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return sum(int(line.split()[1]) for line in done.stdout.splitlines() if line.strip())


def wait_accept_queue(ns: NetNamespace, port: int, count: int, timeout: float = 10.0) -> int:
    """Wait until ``count`` connections wait in the listener's accept queue; return the count."""
    deadline = Deadline(timeout)
    while True:
        queued = accept_queue(ns, port)
        if queued >= count or deadline.expired():
            return queued
        time.sleep(0.05)


# TCP_REPAIR (include/uapi/linux/tcp.h): rebuild a connected socket with chosen sequence numbers.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS, TCP_REPAIR_WINDOW = (
    19,
    20,
    21,
    22,
    29,
)
TCP_RECV_QUEUE, TCP_SEND_QUEUE, TCPOPT_MAXSEG = 1, 2, 2


def rewound(sock: socket.socket, back: int, make: Callable[[], socket.socket]) -> socket.socket:
    """``sock`` rebuilt in place (silently, as CRIU restores one; ``make`` creates the new
    socket, in the right namespace) so that its next segment starts ``back`` bytes before
    what the peer has received: what a retransmission cut differently from the original
    segments looks like to the receiver.  ``sock`` is closed."""

    def seq(queue: int) -> int:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
        return int(struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])

    local, peer = sock.getsockname(), sock.getpeername()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its port for the new one
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    sent, received = seq(TCP_SEND_QUEUE), seq(TCP_RECV_QUEUE)
    window = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
    sock.close()  # in repair mode: nothing goes out
    new = make()
    try:
        # SO_REUSEADDR first: TCP_REPAIR sets the socket's reuse to "force", which binds
        # past a TIME_WAIT socket that shares the port; SO_REUSEADDR after it would lower
        # that back to plain reuse, and the bind would fail (seen in CI).
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        new.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        new.bind(local)
        for queue, value in ((TCP_SEND_QUEUE, sent - back), (TCP_RECV_QUEUE, received)):
            new.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            new.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", value & 0xFFFFFFFF))
        new.connect(peer)
        new.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, window)
        new.setsockopt(
            socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, struct.pack("II", TCPOPT_MAXSEG, 1460)
        )
        new.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    except BaseException:
        new.close()
        raise
    return new
