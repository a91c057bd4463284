"""Structural rules of the package, checked from the source itself.

* The PROXY protocol modules are sans-I/O and stdlib-only: no sockets, no
  threads, no third-party imports, so they can be tested and fuzzed alone and
  never pull a C extension onto the data path.
* Imports flow one way: the protocol layer knows nothing of configuration,
  logging or the CLI; configuration knows nothing of click; on the data path
  pool/relay/upstream/listener < server (the shared base) < tcp, udp < daemon, and only
  cli (and the tools' commands) know click.
* The operations modules sit beside the data path: metrics and routing know
  nothing of connections or the daemon (the data path and the daemon call
  them); notify is a few lines of stdlib; the demo runs mmproxy as a process,
  so it imports neither the daemon nor the CLI.
* The benchmark harness (bench/) measures mmproxy from the outside, as a process started the
  way operators start it: it imports nothing of mmproxy, mmproxy imports nothing of it, and it
  needs nothing beyond the standard library (matplotlib, for the chart, is optional).  Inside
  it, the modules that compute figures do no I/O of their own, and only the CLI ties it together.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmproxy"
BENCH = PACKAGE.parent / "bench"

SANS_IO = [
    "protocol.py",
    "protocol_v1.py",
    "protocol_v2.py",
    "header.py",
    "tlv.py",
    "crc32c.py",
    "errors.py",
]
IO_MODULES = {"socket", "select", "selectors", "threading", "asyncio", "ssl", "os", "subprocess"}


def _imports(module: str, package: Path = PACKAGE) -> set[str]:
    return imports_of((package / module).read_text(), module, package.name)


def imports_of(source: str, filename: str = "<source>", package: str = "mmproxy") -> set[str]:
    """Every module ``source`` imports, at any depth (function-level imports count too).

    ``from mmproxy import tcp`` names ``mmproxy.tcp`` (the package's names are its
    modules, bar ``__version__``), and relative imports are resolved against
    ``package``, so no spelling of an import escapes the rules.
    """
    tree = ast.parse(source, filename=filename)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            names.add(base)
            if base == package:  # the names are the package's modules
                names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(imports: set[str], forbidden: set[str]) -> set[str]:
    """The imports that a rule's ``forbidden`` set rules out."""
    return imports & forbidden


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the package's modules (each found once, from its smallest name)."""
    found: list[list[str]] = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt > path[0] and nxt not in path:
                visit([*path, nxt])

    for start in sorted(graph):
        visit([start])
    return found


def package_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Which of the package's modules each of its modules imports."""
    modules = {path.stem for path in package.glob("*.py")} - {"__init__", "__main__"}
    graph: dict[str, set[str]] = {}
    for module in modules:
        imported = _imports(f"{module}.py", package)
        graph[module] = {
            name.removeprefix(f"{package.name}.")
            for name in imported
            if name.removeprefix(f"{package.name}.") in modules - {module}
        }
    return graph


@pytest.mark.parametrize("module", SANS_IO)
def test_protocol_layer_is_stdlib_only_and_sans_io(module: str) -> None:
    for name in _imports(module):
        top = name.split(".")[0]
        if top == "mmproxy":
            assert name.removeprefix("mmproxy.") + ".py" in SANS_IO, f"{module} imports {name}"
            continue
        assert top in sys.stdlib_module_names or top == "__future__", f"{module} imports {name}"
        assert top not in IO_MODULES, f"{module} does I/O through {name}"


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("config.py", {"click", "mmproxy.cli", "mmproxy.daemon"}),
        ("acl.py", {"click", "mmproxy.cli", "mmproxy.config", "mmproxy.daemon"}),
        ("logs.py", {"click", "mmproxy.cli", "mmproxy.daemon"}),
        # The data path: each layer knows only the ones below it.
        ("pool.py", {"mmproxy.relay", "mmproxy.tcp", "mmproxy.listener", "mmproxy.daemon"}),
        ("relay.py", {"mmproxy.tcp", "mmproxy.listener", "mmproxy.daemon", "mmproxy.pool"}),
        # Small moves off the relay's threads: beside relay, knowing neither the lot nor tcp.
        (
            "hop.py",
            {
                "mmproxy.tcp",
                "mmproxy.parking",
                "mmproxy.pool",
                "mmproxy.listener",
                "mmproxy.daemon",
            },
        ),
        ("upstream.py", {"mmproxy.tcp", "mmproxy.listener", "mmproxy.daemon", "mmproxy.relay"}),
        ("listener.py", {"mmproxy.tcp", "mmproxy.daemon", "mmproxy.cli"}),
        # The kernel relay: below tcp (which hands it pairs), beside splice's relay.
        (
            "sockmap.py",
            {"mmproxy.tcp", "mmproxy.listener", "mmproxy.daemon", "mmproxy.cli", "click"},
        ),
        # What the kernel relay reads about its sockets: below it, knowing nothing of it.
        ("tcpinfo.py", {"mmproxy.sockmap", "mmproxy.bpf", "mmproxy.tcp", "mmproxy.relay"}),
        # The trust policy: below both transports, one decision for both; no sockets of its own.
        (
            "policy.py",
            {
                "mmproxy.tcp",
                "mmproxy.udp",
                "mmproxy.dispatch",
                "mmproxy.flows",
                "mmproxy.eventloop",
                "mmproxy.daemon",
                "mmproxy.listener",
                "mmproxy.relay",
                "mmproxy.pool",
                "mmproxy.metrics",
                "mmproxy.cli",
                "click",
            },
        ),
        (
            "udp.py",
            {
                "mmproxy.tcp",
                "mmproxy.daemon",
                "mmproxy.cli",
                "click",
                "mmproxy.relay",
                "mmproxy.routing",
                "mmproxy.demo",
                "mmproxy.commands",
            },
        ),
        # UDP: the loop < flows < dispatch < udp; none of them knows TCP or the daemon.
        ("eventloop.py", {"mmproxy.flows", "mmproxy.dispatch", "mmproxy.udp", "mmproxy.daemon"}),
        (
            "flows.py",
            {"mmproxy.dispatch", "mmproxy.udp", "mmproxy.tcp", "mmproxy.daemon", "mmproxy.cli"},
        ),
        ("dispatch.py", {"mmproxy.udp", "mmproxy.tcp", "mmproxy.daemon", "mmproxy.cli", "click"}),
        (
            "tcp.py",
            {
                "mmproxy.udp",
                "mmproxy.dispatch",
                "mmproxy.flows",
                "mmproxy.daemon",
                "mmproxy.cli",
                "click",
                "mmproxy.routing",
                "mmproxy.demo",
                "mmproxy.commands",
            },
        ),
        # The servers' shared base: below both servers, above none of the data path's work.
        (
            "server.py",
            {
                "mmproxy.tcp",
                "mmproxy.udp",
                "mmproxy.dispatch",
                "mmproxy.flows",
                "mmproxy.listener",
                "mmproxy.relay",
                "mmproxy.pool",
                "mmproxy.parking",
                "mmproxy.daemon",
                "mmproxy.notify",
                "mmproxy.cli",
                "click",
            },
        ),
        ("daemon.py", {"mmproxy.cli", "click", "mmproxy.demo", "mmproxy.commands"}),
        # Operations: beside the data path, never on top of it.
        (
            "metrics.py",
            {
                "mmproxy.tcp",
                "mmproxy.daemon",
                "mmproxy.listener",
                "mmproxy.relay",
                "mmproxy.pool",
                "mmproxy.cli",
                "click",
            },
        ),
        (
            "routing.py",
            {
                "mmproxy.tcp",
                "mmproxy.daemon",
                "mmproxy.listener",
                "mmproxy.relay",
                "mmproxy.pool",
                "mmproxy.cli",
                "click",
                "mmproxy.metrics",
            },
        ),
        (
            "demo.py",
            {
                "mmproxy.daemon",
                "mmproxy.tcp",
                "mmproxy.listener",
                "mmproxy.cli",
                "mmproxy.commands",
                "click",
            },
        ),
        ("commands.py", {"mmproxy.daemon", "mmproxy.tcp", "mmproxy.listener"}),
    ],
)
def test_imports_flow_one_way(module: str, forbidden: set[str]) -> None:
    assert not violations(_imports(module), forbidden)


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(package_graph()) == []


@pytest.mark.parametrize(
    "planted",
    [
        "from mmproxy import tcp",
        "from mmproxy import pool, tcp as connections",
        "import mmproxy.tcp",
        "from mmproxy.tcp import Connection",
        "from . import tcp",
        "from .tcp import Connection",
        "def later():\n    from mmproxy import tcp",
    ],
)
def test_a_planted_layering_violation_is_caught(planted: str) -> None:
    """Each way of spelling the import that relay.py must not make is seen by the rule."""
    assert violations(imports_of(planted), {"mmproxy.tcp"}) == {"mmproxy.tcp"}


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    package = tmp_path / "mmproxy"
    package.mkdir()
    (package / "cli.py").write_text("def main():\n    from mmproxy import commands\n")
    (package / "commands.py").write_text("from mmproxy.cli import PROG\n")
    (package / "relay.py").write_text("import os\n")
    assert cycles(package_graph(package)) == [["cli", "commands", "cli"]]


@pytest.mark.parametrize("module", ["notify.py", "eventloop.py", "bpf.py", "tcpinfo.py"])
def test_stdlib_only_modules(module: str) -> None:
    """sd_notify is a datagram on a unix socket, the UDP event loop epoll and handlers, the BPF
    assembler ctypes and bpf(2), the TCP counters getsockopt: no library, nothing of mmproxy."""
    for name in _imports(module):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or top == "__future__", f"{module} imports {name}"


BENCH_MODULES = sorted(path.name for path in BENCH.glob("*.py"))


@pytest.mark.parametrize("module", BENCH_MODULES)
def test_bench_measures_mmproxy_from_outside_with_the_stdlib(module: str) -> None:
    for name in _imports(module, BENCH):
        top = name.split(".")[0]
        assert top != "mmproxy", f"bench/{module} imports {name}"
        allowed = top in sys.stdlib_module_names or top in {"__future__", "bench"}
        assert allowed or (module == "chart.py" and top == "matplotlib"), f"{module}: {name}"


@pytest.mark.parametrize("module", sorted(path.name for path in PACKAGE.glob("*.py")))
def test_mmproxy_never_imports_bench(module: str) -> None:
    assert not {name for name in _imports(module) if name.split(".")[0] == "bench"}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # pure arithmetic and definitions: no processes, no namespaces, no output
        ("stats.py", {"bench.procs", "bench.netns", "bench.runner", "bench.cli", "subprocess"}),
        ("settings.py", {"bench.procs", "bench.netns", "bench.runner", "bench.cli", "subprocess"}),
        ("workloads.py", {"bench.netns", "bench.runner", "bench.cli", "subprocess"}),
        # the layers: netns/procs, interpreters < targets < runner < report < chart < cli
        ("netns.py", {"bench.targets", "bench.runner", "bench.report", "bench.cli"}),
        ("procs.py", {"bench.targets", "bench.runner", "bench.report", "bench.cli"}),
        ("targets.py", {"bench.runner", "bench.report", "bench.cli"}),
        ("runner.py", {"bench.report", "bench.chart", "bench.cli"}),
        ("report.py", {"bench.chart", "bench.cli"}),
        ("chart.py", {"bench.cli"}),
        ("build.py", {"bench.runner", "bench.report", "bench.cli"}),
        # the interpreters: below the targets that run them, above nothing but the build cache
        (
            "freethreaded.py",
            {"bench.interpreters", "bench.targets", "bench.runner", "bench.report", "bench.cli"},
        ),
        ("interpreters.py", {"bench.targets", "bench.runner", "bench.report", "bench.cli"}),
    ],
)
def test_bench_imports_flow_one_way(module: str, forbidden: set[str]) -> None:
    assert not _imports(module, BENCH) & forbidden


def test_watchdog_knows_only_notify() -> None:
    """The watchdog pings for whatever health check the daemon hands it; it knows no server."""
    mmproxy_imports = {name for name in _imports("watchdog.py") if name.startswith("mmproxy")}
    assert mmproxy_imports <= {"mmproxy", "mmproxy.notify"}, mmproxy_imports
