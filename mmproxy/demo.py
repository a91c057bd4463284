"""``mmproxy demo``: mmproxy working on this machine, without touching its network.

As root, the demo moves itself into a network namespace of its own
(``unshare(CLONE_NEWNET)``: it has no name, only loopback, and it ends with
the process, so nothing can be left behind), adds the policy routing there with
:mod:`mmproxy.routing`, starts a backend that answers every connection with
the address it sees, starts mmproxy (``python -m mmproxy``, a child process
that inherits the namespace and dies with the demo), and sends a few
connections whose PROXY v1 and v2 headers claim documentation-range client
addresses, IPv4 and IPv6.  It prints what each header said next to what the
backend saw, stops mmproxy, and exits 0 only when every pair matched.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from mmproxy import routing
from mmproxy.header import host_port
from mmproxy.protocol import InetAddress, ProxyHeader, encode

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
TIMEOUT = 10.0  # seconds for a connection, or for mmproxy to stop
START_TIMEOUT = 30.0  # seconds for mmproxy to start listening (a busy machine is slow)

Peer = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Case:
    """One connection: the header's version, the client it names, the address it reached."""

    version: int
    client: Peer
    destination: Peer

    @property
    def label(self) -> str:
        family = "IPv6" if ":" in self.client[0] else "IPv4"
        return f"v{self.version} {family}"


# Documentation ranges only (RFC 5737, RFC 3849).
CASES = (
    Case(1, ("198.51.100.7", 40001), ("203.0.113.10", 443)),
    Case(2, ("203.0.113.25", 40002), ("203.0.113.10", 443)),
    Case(1, ("2001:db8::7", 40003), ("2001:db8::443", 443)),
    Case(2, ("2001:db8:cafe::25", 40004), ("2001:db8::443", 443)),
)


def show(peer: Peer | None) -> str:
    """``198.51.100.7:40001`` / ``[2001:db8::7]:40003``, as mmproxy's logs write addresses."""
    if peer is None:
        return "nothing"
    return host_port(*peer)


def run(out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The whole demo; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    if os.geteuid() != 0:
        print("mmproxy demo: needs root (it makes a network namespace); run: sudo mmproxy demo",
              file=err)  # fmt: skip
        return EXIT_FAILED
    try:
        _enter_private_namespace()
    except OSError as error:
        print(f"mmproxy demo: cannot make a network namespace: {error.strerror or error}", file=err)
        return EXIT_FAILED
    # SIGINT explicitly too: started as a background job of a script, the demo would
    # inherit SIGINT ignored, and Python leaves it so.
    previous = {
        signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    demo = Demo(out)
    try:
        return EXIT_OK if demo.run() else EXIT_FAILED
    except KeyboardInterrupt:
        print("\nmmproxy demo: interrupted; cleaning up", file=err)
        return EXIT_INTERRUPTED
    except (OSError, RuntimeError, routing.RoutingError) as error:
        print(f"mmproxy demo: {error}", file=err)
        demo.show_logs(err)
        return EXIT_FAILED
    finally:
        demo.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise KeyboardInterrupt


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _enter_private_namespace() -> None:
    """Move this process (its only thread, so far) into a new network namespace."""
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        unshare(CLONE_NEWNET)
        return
    if _libc().unshare(CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Backend:
    """Listens on 127.0.0.1 and ::1 (one port); answers each connection with its peer."""

    def __init__(self, out: TextIO, *, ipv6: bool) -> None:
        self._out = out
        self._v4 = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._v4.getsockname()[1])
        self._listeners = [self._v4]
        if ipv6:
            try:
                self._listeners.append(
                    socket.create_server(("::1", self.port), family=socket.AF_INET6)
                )
            except OSError:
                self._v4.close()
                raise
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="demo-backend", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        listeners = self._listeners
        while not self._stop.is_set():
            ready, _, _ = select.select(listeners, [], [], 0.1)
            for listener in ready:
                with contextlib.suppress(OSError):
                    sock, address = listener.accept()
                    with sock:
                        self._answer(sock, (str(address[0]), int(address[1])))

    def _answer(self, sock: socket.socket, peer: Peer) -> None:
        print(f"  backend: connection from {show(peer)}", file=self._out, flush=True)
        sock.settimeout(TIMEOUT)
        received = b""
        while b"\n" not in received and len(received) < 1024:
            chunk = sock.recv(1024)
            if not chunk:
                break
            received += chunk
        sock.sendall(f"{peer[0]} {peer[1]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for listener in self._listeners:
            listener.close()


class Mmproxy:
    """``python -m mmproxy`` in this namespace, in front of the backend."""

    def __init__(self, backend_port: int) -> None:
        self.flags = [
            *("-l", "127.0.0.1:0"),
            *("-4", f"127.0.0.1:{backend_port}"),
            *("-6", f"[::1]:{backend_port}"),
            *("-v", "1", "--log-format", "json", "--drain-timeout", "1"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
        env.pop("NOTIFY_SOCKET", None)
        libc = _libc()

        def die_with_the_demo() -> None:  # runs in the child, before exec
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and fixed flags
            [sys.executable, "-m", "mmproxy", *self.flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd="/",  # "-m" must find the installed package, not a directory named like it
            preexec_fn=die_with_the_demo,  # before any thread of ours starts
        )
        self.lines: list[str] = []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="demo-mmproxy-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # noqa: S101 - Popen was given stdout=PIPE
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                self._lock.notify_all()

    def _records(self) -> Iterator[dict[str, Any]]:
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record

    def wait_listening(self) -> Peer:
        """The address mmproxy listens on, from its ``listening`` log line."""
        deadline = time.monotonic() + START_TIMEOUT
        with self._lock:
            while True:
                for record in self._records():
                    if record.get("msg") == "listening":
                        host, _, port = str(record.get("listenAddr")).rpartition(":")
                        return host.strip("[]"), int(port)
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None or remaining <= 0:
                    raise RuntimeError("mmproxy did not start")
                self._lock.wait(min(remaining, 0.1))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class Demo:
    """The steps, and what must be undone (the namespace itself goes with the process)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._backend: Backend | None = None
        self._mmproxy: Mmproxy | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    def run(self) -> bool:
        self.say("mmproxy demo: in a network namespace of this process's own (only loopback);")
        self.say("this machine's network is not touched, and the namespace ends with the demo.")
        self.say()
        with routing.Netlink() as netlink:
            netlink.set_up_loopback()
        self.say("policy routing, as 'mmproxy routing apply' adds it:")
        for piece, _added in routing.apply():
            self.say(f"  {piece.command()}")
        ipv6 = routing.ipv6_available()
        cases = [case for case in CASES if ipv6 or ":" not in case.client[0]]
        self._backend = backend = Backend(self._out, ipv6=ipv6)
        self._mmproxy = mmproxy = Mmproxy(backend.port)
        backend.start()
        listen = mmproxy.wait_listening()
        if not ipv6:
            self.say("(this host has no IPv6: IPv4 clients only)")
        where = f"127.0.0.1:{backend.port}" + (f" and [::1]:{backend.port}" if ipv6 else "")
        self.say(f"backend: {where}, answering each")
        self.say("         connection with the client address it sees")
        self.say(f"mmproxy: pid {mmproxy.proc.pid}, mmproxy {' '.join(mmproxy.flags)}")
        self.say(f"         listening on {show(listen)}")
        self.say()
        self.say("connections through mmproxy, each with a PROXY header:")
        results = [(case, self._connect(listen, case)) for case in cases]
        self.say()
        width = max(len(show(case.client)) for case in cases) + 2
        self.say(f"  {'header':8}{'header said':{width}}    backend saw")
        matched = 0
        for case, seen in results:
            ok = seen == case.client
            matched += ok
            said, saw = show(case.client), show(seen)
            self.say(f"  {case.label:8}{said:{width}} -> {saw:{width}}{'ok' if ok else 'MISMATCH'}")
        self.say()
        code = mmproxy.stop()
        if matched == len(cases) and code == 0:
            self.say(f"all {matched} matched: the backend saw each client's own address,")
            self.say("not mmproxy's. mmproxy has stopped; the namespace ends with this process.")
            return True
        missed = len(cases) - matched
        self.say(f"{missed} of {len(cases)} did not match; mmproxy's exit code: {code}")
        self.show_logs(self._out)
        return False

    def _connect(self, listen: Peer, case: Case) -> Peer | None:
        header = ProxyHeader.proxy(
            InetAddress.of(*case.client), InetAddress.of(*case.destination), version=case.version
        )
        try:
            with socket.create_connection(listen, timeout=TIMEOUT) as sock:
                sock.sendall(encode(header) + b"hello\n")
                reply = b""
                while chunk := sock.recv(1024):
                    reply += chunk
        except OSError as error:
            self.say(f"  {case.label}: {error}")
            return None
        host, _, port = reply.decode(errors="replace").strip().rpartition(" ")
        return (host, int(port)) if port.isdigit() else None

    def show_logs(self, stream: TextIO) -> None:
        if self._mmproxy is not None and self._mmproxy.lines:
            print("mmproxy's log:", file=stream)
            for line in self._mmproxy.lines[-20:]:
                print(f"  {line}", file=stream)

    def close(self) -> None:
        if self._mmproxy is not None:
            self._mmproxy.stop()
        if self._backend is not None:
            self._backend.close()
