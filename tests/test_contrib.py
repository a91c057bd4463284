"""contrib/: the systemd unit verifies with systemd-analyze, the HAProxy and nginx examples pass
their own configuration checks, and the examples agree with each other.

``systemd-analyze verify`` needs no running systemd: it parses the unit, checks every
directive and that each Exec line's program exists, so the test points a copy of the unit at
the mmproxy it is testing.  ``haproxy -c`` and ``nginx -t`` parse without binding a port.  The
README's install command installs the three packages (Debian's policy-rc.d keeps their
services from starting in containers; nothing here starts them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmproxy.metrics import PrometheusMetrics

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "mmproxy.service"
INSTALLED_PATH = "/usr/local/bin/mmproxy"
MMPROXY = Path(sys.executable).parent / "mmproxy"  # the console script of this environment


def tool(name: str, package: str) -> str:
    """The program's path; in CI a missing one fails (README's install command installs it)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: README's install command installs {package}")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return found


def systemd_analyze() -> str:
    return tool("systemd-analyze", "systemd")


def verify(unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    unit = directory / "mmproxy.service"
    unit.write_text(unit_text)
    return subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def about_our_unit(result: subprocess.CompletedProcess[str]) -> list[str]:
    """systemd-analyze's complaints about this unit (not about other units on the machine)."""
    return [line for line in result.stderr.splitlines() if "mmproxy.service" in line]


def unit_for_this_environment() -> str:
    assert MMPROXY.is_file(), f"no console script at {MMPROXY}"
    return UNIT.read_text().replace(INSTALLED_PATH, str(MMPROXY))


def test_unit_verifies(tmp_path: Path) -> None:
    result = verify(unit_for_this_environment(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert about_our_unit(result) == [], result.stderr


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("Type=notify", "Type=notifyy"), "Failed to parse service type"),
        (("ProtectSystem=strict", "ProtectSystem=very"), "Failed to parse protect system value"),
        ((f"ExecStart={MMPROXY}\n", "ExecStart=/nonexistent/mmproxy\n"), "is not executable"),
    ],
)
def test_verify_catches_mistakes(tmp_path: Path, change: tuple[str, str], complaint: str) -> None:
    """The check above is alive: the same run reports a broken copy of the unit."""
    text = unit_for_this_environment()
    assert change[0] in text
    result = verify(text.replace(change[0], change[1]), tmp_path)
    assert any(complaint in line for line in about_our_unit(result)), result.stderr


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_is_hardened_as_the_issue_asks() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStartPre"] == [f"{INSTALLED_PATH} routing apply"]
    assert unit["ExecStart"] == [INSTALLED_PATH]
    assert unit["ExecStopPost"] == [f"{INSTALLED_PATH} routing remove"]
    # CAP_NET_BIND_SERVICE: a transient user may not bind ports below 1024 without it.
    assert unit["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["Restart"] == ["on-failure"]
    assert int(unit["LimitNOFILE"][0]) >= 65536
    families = unit["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"} == set(families)
    # The stop timeout leaves room for the default 30 s drain.
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > 30
    # A watchdog (mmproxy pings at half of it while its acceptors serve), and a restart after it.
    assert int(unit["WatchdogSec"][0].rstrip("s")) >= 10


def test_environment_example_is_a_valid_configuration(tmp_path: Path) -> None:
    """The daemon accepts mmproxy.env.example as its whole configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
    for name, value in directives((CONTRIB / "mmproxy.env.example").read_text()).items():
        env[name] = value[-1]
    assert env["MMPROXY_ALLOWED_SUBNETS"] == "/etc/mmproxy/allowed-subnets.txt"
    env["MMPROXY_ALLOWED_SUBNETS"] = str(CONTRIB / "allowed-subnets.example")
    done = subprocess.run(
        [str(MMPROXY), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert '"listen": "0.0.0.0:25577"' in done.stdout
    assert '"target6": "[::1]:25578"' in done.stdout
    assert '"allowedSubnetsCount": 3' in done.stdout


def test_load_balancer_examples_send_the_header_to_mmproxy() -> None:
    """Both examples point at mmproxy's port from the environment example, with a header."""
    haproxy = (CONTRIB / "haproxy.cfg").read_text()
    servers = [line.split() for line in haproxy.splitlines() if line.strip().startswith("server ")]
    assert servers, haproxy
    for server in servers:
        assert server[2] == "192.0.2.10:25577"
        assert "send-proxy-v2" in server
    nginx = (CONTRIB / "nginx-stream.conf").read_text()
    assert re.search(r"^\s*server 192\.0\.2\.10:25577;", nginx, re.MULTILINE)
    assert re.search(r"^\s*proxy_protocol on;", nginx, re.MULTILINE)
    assert re.search(r"^stream \{", nginx, re.MULTILINE)


# --------------------------------------------------------------- the load balancers' own checks


def haproxy_check(config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "haproxy.cfg"
    path.write_text(config)
    return subprocess.run(
        [tool("haproxy", "haproxy"), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def nginx_check(stream_config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a main file that loads the stream module and includes the example."""
    (directory / "nginx-stream.conf").write_text(stream_config)
    main = directory / "nginx.conf"
    main.write_text(
        "include /etc/nginx/modules-enabled/*.conf;\n"  # Debian loads ngx_stream_module here
        f"pid {directory}/nginx.pid;\n"
        "events {}\n"
        f"include {directory}/nginx-stream.conf;\n"
    )
    return subprocess.run(
        [tool("nginx", "nginx libnginx-mod-stream"), "-t",
         "-e", str(directory / "error.log"), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def test_haproxy_example_is_valid(tmp_path: Path) -> None:
    done = haproxy_check((CONTRIB / "haproxy.cfg").read_text(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr
    broken = (CONTRIB / "haproxy.cfg").read_text().replace("send-proxy-v2 ", "send-proxy-v9 ")
    assert haproxy_check(broken, tmp_path).returncode != 0


def test_nginx_example_is_valid(tmp_path: Path) -> None:
    done = nginx_check((CONTRIB / "nginx-stream.conf").read_text(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    broken = (
        (CONTRIB / "nginx-stream.conf")
        .read_text()
        .replace("proxy_protocol on", "proxy_protocol v2")
    )
    assert nginx_check(broken, tmp_path).returncode != 0


# --------------------------------------------------------------------------- Grafana dashboard

DASHBOARD = CONTRIB / "grafana-dashboard.json"
# Names of series: mmproxy's own, and prometheus_client's process and platform collectors.
SERIES_NAME = re.compile(r"\b((?:mmproxy|process|python)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b((?:mmproxy|process|python)_[a-z0-9_]+)\{([^}]*)\}")
GROUPING = re.compile(r"\bby \(([^)]*)\)")
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes


def exported_series() -> dict[str, set[str]]:
    """Every series name mmproxy's registry exports, with its label names.

    Each recording method is called once first, so that families whose label values appear
    only with use (drops by reason) have a sample to show their labels.
    """
    metrics = PrometheusMetrics()
    metrics.accepted()
    metrics.refused("not_allowed")
    metrics.header_parsed(0.001)
    metrics.header_error("incomplete")
    metrics.upstream_failed()
    metrics.opened()
    metrics.closed(1, 1)
    metrics.udp_flow_opened()
    metrics.udp_flow_closed()
    metrics.udp_datagram("to_target")
    metrics.udp_dropped("no_flow")
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    variables = dashboard["templating"]["list"]
    queries += [item["query"]["query"] for item in variables if item["type"] == "query"]
    return queries


def unknown_series(queries: list[str], series: dict[str, set[str]]) -> list[str]:
    """What the queries ask for that the registry does not export: names, then labels."""
    problems = []
    for query in queries:
        names = SERIES_NAME.findall(query)
        if not names:
            problems.append(f"no series in {query!r}")
        problems += [f"{name} (in {query!r})" for name in names if name not in series]
        for name, matchers in SELECTOR.findall(query):
            for matcher in filter(None, (part.strip() for part in matchers.split(","))):
                label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
                if label not in series.get(name, set()) | SCRAPE_LABELS:
                    problems.append(f"label {label} of {name} (in {query!r})")
        known = SCRAPE_LABELS.union(*(series.get(name, set()) for name in names))
        for grouping in GROUPING.findall(query):
            problems += [
                f"grouping label {label} (in {query!r})"
                for label in (part.strip() for part in grouping.split(","))
                if label not in known
            ]
    return problems


def test_dashboard_queries_only_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    assert unknown_series(queries, exported_series()) == []


def test_dashboard_covers_every_mmproxy_metric() -> None:
    """Connections, refusals, header errors and latency, bytes, UDP flows and drops: each
    family mmproxy exports has a panel (build_info feeds the instance picker)."""
    queries = " ".join(dashboard_queries(json.loads(DASHBOARD.read_text())))
    queried = set(SERIES_NAME.findall(queries))
    registry = PrometheusMetrics().registry
    families = [family.name for family in registry.collect() if family.name.startswith("mmproxy_")]
    assert len(families) >= 10
    suffixes = ("", "_total", "_info", "_bucket", "_sum", "_count")
    missing = [name for name in families if not queried & {name + end for end in suffixes}]
    assert missing == [], missing


def test_dashboard_check_catches_a_wrong_name_or_label() -> None:
    """The check above is alive: a misspelt series, label or grouping is reported."""
    series = exported_series()
    good = 'sum by (reason) (rate(mmproxy_connections_refused_total{instance=~"x"}[5m]))'
    assert unknown_series([good], series) == []
    for broken in (
        good.replace("refused_total", "refusd_total"),
        good.replace("instance=~", "reasn=~"),
        good.replace("by (reason)", "by (direction)"),
        "sum(rate(up[5m]))",
    ):
        assert unknown_series([broken], series), broken


def test_dashboard_is_importable() -> None:
    """What Grafana needs to import it: unique panel ids, a place on the grid for each, one
    data source variable every query goes through, unique query ids within a panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids)
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    (source,) = [item for item in dashboard["templating"]["list"] if item["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("datasource", "prometheus")
