"""``mmproxy routing check|apply|remove`` and the daemon's start-up check, in namespaces made here.

Each test makes a namespace of its own without the policy routes (``routes=False``), so what
the tool reports, adds and removes is exactly what the test arranged.  ``ip`` gives the second
opinion: the rules the tool adds over netlink must be the ones ``ip rule``/``ip route`` show,
and rules added by ``ip`` must be the ones the tool recognises and removes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_runner import Daemon
from netns import Backend, ClientAddresses, Deadline, Net, NetNamespace, exchange, namespace
from test_tcp import header

# What `ip rule` / `ip route` print for the README's setup (table 123).
RULE4 = "from 127.0.0.1/8 iif lo lookup 123"
RULE6 = "from ::1 iif lo lookup 123"
ROUTE4 = "local default dev lo"
ROUTE6 = "local default dev lo"
# What `routing apply` adds carries mmproxy's protocol mark (routing.PROTOCOL).
MARKED = " proto 109"

PIECES = [
    "ip rule add from 127.0.0.1/8 iif lo table 123",
    "ip route add local 0.0.0.0/0 dev lo table 123",
    "ip -6 rule add from ::1/128 iif lo table 123",
    "ip -6 route add local ::/0 dev lo table 123",
]
# Run as root without CAP_NET_ADMIN (nor CAP_NET_RAW, which also allows IP_TRANSPARENT):
# neither kept across exec nor inheritable.
WITHOUT_NET_ADMIN = (
    "setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw", "--",
)  # fmt: skip


def tool(
    ns: NetNamespace, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m mmproxy ARGS`` inside ``ns``, as an operator would run it there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
    return subprocess.run(
        ["ip", "netns", "exec", ns.name, *prefix, sys.executable, "-m", "mmproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
        check=False,
    )


def ip_show(ns: NetNamespace, *args: str) -> str:
    done = subprocess.run(
        ["ip", "-n", ns.name, *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout


def custom_rules(ns: NetNamespace, version: str = "-4") -> list[str]:
    """``ip rule`` lines besides the kernel's three (local, main, default), priorities cut."""
    lines = [line.partition(":")[2].strip() for line in ip_show(ns, version, "rule").splitlines()]
    return [line for line in lines if line not in ("from all lookup local", "from all lookup main",
                                                  "from all lookup default")]  # fmt: skip


def table_routes(ns: NetNamespace, version: str, table: int = 123) -> list[str]:
    text = ip_show(ns, version, "route", "show", "table", str(table))
    return [" ".join(line.split()[:4]) for line in text.splitlines()]


@pytest.fixture
def bare() -> Iterator[tuple[NetNamespace, Net]]:
    """A namespace with loopback up and no policy routes."""
    with namespace(f"mmproxy-routing-{os.getpid()}", routes=False) as (ns, sockets):
        yield ns, Net(ns, sockets)


def test_check_lists_what_is_missing_and_the_commands(bare: tuple[NetNamespace, Net]) -> None:
    ns, _ = bare
    done = tool(ns, "routing", "check")
    assert done.returncode == 1, done
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    for piece in PIECES:
        assert f"  missing  {piece}" in lines, done.stdout
        assert f"  {piece}" in lines  # the commands to run, each alone on its line
    assert "  ok       IPv4" in lines
    assert "  ok       IPv6" in lines
    assert "4 missing. Add them as root with 'mmproxy routing apply', or run:" in lines


def test_apply_adds_exactly_the_readme_setup_and_is_idempotent(
    bare: tuple[NetNamespace, Net],
) -> None:
    ns, _ = bare
    done = tool(ns, "routing", "apply")
    assert done.returncode == 0, done
    assert done.stdout.splitlines() == [f"added    {piece}" for piece in PIECES]
    assert custom_rules(ns, "-4") == [RULE4 + MARKED]
    assert custom_rules(ns, "-6") == [RULE6 + MARKED]
    assert table_routes(ns, "-4") == [ROUTE4]
    assert table_routes(ns, "-6") == [ROUTE6]
    assert "proto 109" in ip_show(ns, "-4", "route", "show", "table", "123")

    checked = tool(ns, "routing", "check")
    assert checked.returncode == 0, checked
    assert [f"  present  {piece}" for piece in PIECES] == checked.stdout.splitlines()[1:5]
    assert checked.stdout.splitlines()[-1] == "all in place"

    again = tool(ns, "routing", "apply")
    assert again.returncode == 0, again
    assert again.stdout.splitlines() == [f"present  {piece}" for piece in PIECES]
    assert custom_rules(ns, "-4") == [RULE4 + MARKED]  # no second copy
    assert custom_rules(ns, "-6") == [RULE6 + MARKED]


def test_remove_deletes_them_and_is_idempotent(bare: tuple[NetNamespace, Net]) -> None:
    ns, _ = bare
    assert tool(ns, "routing", "apply").returncode == 0
    done = tool(ns, "routing", "remove")
    assert done.returncode == 0, done
    deleted = [piece.replace(" add ", " del ") for piece in reversed(PIECES)]
    assert done.stdout.splitlines() == [f"removed  {piece}" for piece in deleted]
    assert custom_rules(ns, "-4") == []
    assert custom_rules(ns, "-6") == []
    assert table_routes(ns, "-4") == []
    assert table_routes(ns, "-6") == []
    assert tool(ns, "routing", "check").returncode == 1

    again = tool(ns, "routing", "remove")
    assert again.returncode == 0, again
    assert again.stdout.splitlines() == [f"absent   {piece}" for piece in deleted]


def test_mark_and_table(bare: tuple[NetNamespace, Net]) -> None:
    """-mark adds the fwmark rules (IPv4 and IPv6); --table moves everything to that table."""
    ns, _ = bare
    done = tool(ns, "routing", "apply", "-mark", "42", "--table", "100")
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[-2:] == [
        "added    ip rule add fwmark 42 lookup 100",
        "added    ip -6 rule add fwmark 42 lookup 100",
    ]
    assert custom_rules(ns, "-4") == ["from 127.0.0.1/8 iif lo lookup 100" + MARKED,
                                      "from all fwmark 0x2a lookup 100" + MARKED]  # fmt: skip
    assert custom_rules(ns, "-6") == [
        "from ::1 iif lo lookup 100" + MARKED,
        "from all fwmark 0x2a lookup 100" + MARKED,
    ]
    assert table_routes(ns, "-4", 100) == [ROUTE4]

    assert tool(ns, "routing", "check", "-mark=42", "-table=100").returncode == 0
    assert tool(ns, "routing", "check", "--table", "100").returncode == 0  # no mark: not needed
    wrong_mark = tool(ns, "routing", "check", "-mark", "43", "--table", "100")
    assert wrong_mark.returncode == 1
    assert "  missing  ip rule add fwmark 43 lookup 100" in wrong_mark.stdout.splitlines()
    assert "routing apply --table 100 -mark 43" in wrong_mark.stdout
    wrong_table = tool(ns, "routing", "check")
    assert wrong_table.returncode == 1
    assert wrong_table.stdout.count("  missing  ") == 4

    removed = tool(ns, "routing", "remove", "-mark", "42", "--table", "100")
    assert removed.returncode == 0, removed
    assert custom_rules(ns, "-4") == []
    assert custom_rules(ns, "-6") == []
    assert table_routes(ns, "-4", 100) == []


def test_rules_added_with_ip_are_recognised_and_kept() -> None:
    """The setup as the README's ``ip`` commands make it (kernel-chosen priorities): check
    accepts it, apply adds nothing, and remove (the unit's ExecStopPost) leaves it alone, since
    mmproxy did not add it (an operator, or another proxy on this host, relies on it)."""
    with namespace(f"mmproxy-routing-ip-{os.getpid()}", routes=True) as (ns, _sockets):
        rules4, rules6 = custom_rules(ns, "-4"), custom_rules(ns, "-6")
        assert rules4 == [RULE4]
        assert tool(ns, "routing", "check").returncode == 0
        applied = tool(ns, "routing", "apply")
        assert applied.stdout.splitlines() == [f"present  {piece}" for piece in PIECES]
        done = tool(ns, "routing", "remove")
        assert done.returncode == 0, done
        assert done.stdout.count("kept     ") == 4, done.stdout
        assert "not added by mmproxy routing apply" in done.stdout
        assert custom_rules(ns, "-4") == rules4
        assert custom_rules(ns, "-6") == rules6
        assert table_routes(ns, "-4") == [ROUTE4]
        assert table_routes(ns, "-6") == [ROUTE6]
        assert tool(ns, "routing", "check").returncode == 0


def test_remove_takes_only_its_own_beside_a_hand_made_copy(bare: tuple[NetNamespace, Net]) -> None:
    """The same rule twice, one by hand and one by apply (with another table for the rest):
    remove deletes the marked one and keeps the other."""
    ns, _ = bare
    assert tool(ns, "routing", "apply").returncode == 0
    ns.ip("rule", "add", "from", "127.0.0.1/8", "iif", "lo", "table", "123", "priority", "100")
    assert custom_rules(ns, "-4") == [RULE4, RULE4 + MARKED]
    done = tool(ns, "routing", "remove")
    assert done.returncode == 0, done
    assert "removed  ip rule del from 127.0.0.1/8 iif lo table 123" in done.stdout
    assert custom_rules(ns, "-4") == [RULE4]
    assert custom_rules(ns, "-6") == []
    assert table_routes(ns, "-4") == []


def test_applied_routing_lets_mmproxy_relay(
    bare: tuple[NetNamespace, Net], addresses: ClientAddresses
) -> None:
    """Proof that the setup is the right one: after ``routing apply`` mmproxy relays both
    families, and the daemon's start-up check has nothing to warn about."""
    ns, net = bare
    assert tool(ns, "routing", "apply").returncode == 0
    backend4 = Backend(net.sockets, "127.0.0.1")
    backend6 = Backend(net.sockets, "::1")
    daemon = Daemon(
        ns, ["-l", "127.0.0.1:0", "-4", backend4.target(), "-6", backend6.target(), "-v", "1"]
    )
    try:
        for source, backend in ((addresses.v4(), backend4), (addresses.v6(), backend6)):
            destination = ("2001:db8::1", 443) if ":" in source[0] else ("203.0.113.1", 443)
            with net.sockets.connect((daemon.host, daemon.port)) as sock:
                sock.sendall(header(source, destination, 2))
                assert exchange(sock, b"routed", Deadline(10)) == b"routed", daemon.describe()
            assert backend.peers() == [source]
        assert daemon.stop() == 0
        assert [w for w in _warnings(daemon) if w.startswith("missing")] == []
        assert [line for line in daemon.logs if line.get("level") == "ERROR"] == []
    finally:
        daemon.stop()
        backend4.close()
        backend6.close()


def _warnings(daemon: Daemon) -> list[str]:
    return [str(line["msg"]) for line in daemon.logs if line.get("level") == "WARN"]


def test_daemon_warns_once_per_missing_piece(bare: tuple[NetNamespace, Net]) -> None:
    """Start-up checks the routing: one WARN per missing piece, and it still starts.

    With -mark the fwmark rules are expected too; --no-routing-check skips the check.
    """
    ns, _ = bare
    daemons: list[Daemon] = []
    try:
        plain = Daemon(ns, ["-l", "127.0.0.1:0", "-v", "1"])
        daemons.append(plain)
        marked = Daemon(ns, ["-l", "127.0.0.1:0", "-mark", "7"])
        daemons.append(marked)
        quiet = Daemon(ns, ["-l", "127.0.0.1:0", "--no-routing-check"])
        daemons.append(quiet)
        for daemon in daemons:
            assert daemon.stop() == 0, daemon.describe()
    finally:
        for daemon in daemons:
            daemon.stop()
    expected = [
        "missing policy rule: ip rule add from 127.0.0.1/8 iif lo table 123",
        "missing local route: ip route add local 0.0.0.0/0 dev lo table 123",
        "missing policy rule: ip -6 rule add from ::1/128 iif lo table 123",
        "missing local route: ip -6 route add local ::/0 dev lo table 123",
    ]
    hint = " (see: mmproxy routing check)"
    routing_warnings = [w for w in _warnings(plain) if w.startswith("missing")]
    assert routing_warnings == [line + hint for line in expected], plain.describe()
    marked_warnings = [w for w in _warnings(marked) if w.startswith("missing")]
    assert len(marked_warnings) == 6
    assert "missing fwmark rule: ip rule add fwmark 7 lookup 123" + hint in marked_warnings
    assert "missing fwmark rule: ip -6 rule add fwmark 7 lookup 123" + hint in marked_warnings
    assert [w for w in _warnings(quiet) if w.startswith("missing")] == []
    for daemon in daemons:
        assert not [line for line in daemon.logs if line.get("level") == "ERROR"]


def test_daemon_checks_only_for_backends_on_loopback(
    bare: tuple[NetNamespace, Net], tmp_path: Path
) -> None:
    """The routes are for replies from a backend on loopback: remote backends need none of them
    (with -dynamic-destination any destination may be local, so the check stays on)."""
    ns, _ = bare
    subnets = tmp_path / "subnets"
    subnets.write_text("127.0.0.0/8\n")
    dynamic = ["-dynamic-destination", "-allowed-subnets", str(subnets)]
    remote = ["-l", "127.0.0.1:0", "-4", "203.0.113.9:443", "-6", "[2001:db8::9]:443"]
    half = ["-l", "127.0.0.1:0", "-4", "203.0.113.9:443", "-6", "[::1]:443"]
    daemons = []
    try:
        for flags in (remote, half, [*remote, *dynamic]):
            daemons.append(Daemon(ns, flags))  # noqa: PERF401 - kept at once, for the finally
        for daemon in daemons:
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            daemon.stop()
    missing = [[w for w in _warnings(d) if w.startswith("missing")] for d in daemons]
    assert missing[0] == []
    assert len(missing[1]) == 2  # the IPv6 rule and route: only [::1] is on loopback
    assert all("ip -6 " in w for w in missing[1]), missing[1]
    assert len(missing[2]) == 4


def test_daemon_finds_the_table_the_rule_names(bare: tuple[NetNamespace, Net]) -> None:
    """An operator's own table number is no reason to warn: the daemon follows the rule."""
    ns, _ = bare
    assert tool(ns, "routing", "apply", "--table", "200", "-mark", "5").returncode == 0
    daemon = Daemon(ns, ["-l", "127.0.0.1:0", "-mark", "5"])
    try:
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    assert [w for w in _warnings(daemon) if w.startswith("missing")] == [], daemon.describe()


def test_without_cap_net_admin(bare: tuple[NetNamespace, Net]) -> None:
    """Root without CAP_NET_ADMIN: the check says IP_TRANSPARENT cannot be set (exit 1), apply
    fails with one line, and the daemon stops at start-up with one line naming the capability."""
    ns, _ = bare
    checked = tool(ns, "routing", "check", prefix=WITHOUT_NET_ADMIN)
    assert checked.returncode == 1
    assert "  no       IPv4: needs CAP_NET_ADMIN" in checked.stdout
    assert "mmproxy needs CAP_NET_ADMIN to set IP_TRANSPARENT" in checked.stdout

    applied = tool(ns, "routing", "apply", prefix=WITHOUT_NET_ADMIN)
    assert applied.returncode == 1
    assert applied.stdout == ""
    assert applied.stderr.splitlines() == [
        (
            "mmproxy: error: routing apply: ip rule add from 127.0.0.1/8 iif lo table 123: "
            "Operation not permitted (needs root or CAP_NET_ADMIN)"
        )
    ]
    assert custom_rules(ns) == []

    daemon = tool(ns, "-l", "127.0.0.1:0", prefix=WITHOUT_NET_ADMIN)
    assert daemon.returncode == 1
    assert "Traceback" not in daemon.stderr
    errors = [line for line in daemon.stdout.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1, daemon.stdout
    assert "CAP_NET_ADMIN" in errors[0]
