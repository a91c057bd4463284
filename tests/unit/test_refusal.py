"""One refusal vocabulary: every reason a metric can carry is a declared label value.

The check reads the package's source: each call that hands a reason to a counter
(``header_error``, ``refused``, ``udp_dropped``, the dispatcher's ``_dropped``), each
``RefusedError`` raised and each TCP ``Outcome`` with a metric names a :class:`Refusal`
(directly or through a module-level alias of one), and that code must be among the
label values the counter declares at start-up, so a dashboard sees it from the first scrape.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmproxy import metrics
from mmproxy.errors import Reason, Refusal

PACKAGE = Path(metrics.__file__).resolve().parent

HEADER = set(metrics.HEADER_REASONS)
# A TCP connection whose upstream failed is counted by upstream_connect_failures instead.
TCP_BEFORE_RELAY = HEADER | {Refusal.UPSTREAM_FAILED}
DROP = set(metrics.DROP_REASONS)
REFUSED = set(metrics.REFUSED_REASONS)

# Which declared set a RefusedError raised in a module ends up in.
RAISED_IN = {
    "tcp": TCP_BEFORE_RELAY,
    "policy": TCP_BEFORE_RELAY & DROP,  # both transports call policy.decide()
    "udp": DROP,
    "dispatch": DROP,
    "flows": DROP,
}
CALLS = {"header_error": HEADER, "refused": REFUSED, "udp_dropped": DROP, "_dropped": DROP}


def _refusal(node: ast.expr, names: dict[str, object]) -> Refusal | None:
    if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "Refusal":
        return Refusal[node.attr]
    if isinstance(node, ast.Name) and isinstance(names.get(node.id), Refusal):
        value = names[node.id]
        assert isinstance(value, Refusal)
        return value
    return None


def sites(
    source: str, module: str, names: dict[str, object]
) -> Iterator[tuple[int, Refusal, set[str]]]:
    """(line, reason, the label values it must be among) for each reason handed on in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        argument: ast.expr | None = None
        allowed: set[str] | None = None
        if name in CALLS and node.args:
            argument, allowed = node.args[0], CALLS[name]
        elif name == "RefusedError" and node.args:
            argument, allowed = node.args[0], RAISED_IN.get(module, set())
        elif name == "Outcome":
            metric = [kw.value for kw in node.keywords if kw.arg == "metric"]
            argument = node.args[3] if len(node.args) > 3 else (metric[0] if metric else None)
            allowed = TCP_BEFORE_RELAY
        if argument is None or allowed is None:
            continue
        reason = _refusal(argument, names)
        if reason is not None:
            yield node.lineno, reason, allowed


def undeclared(source: str, module: str, names: dict[str, object]) -> list[str]:
    return [
        f"{module}.py:{line}: {reason.value}"
        for line, reason, allowed in sites(source, module, names)
        if reason not in allowed
    ]


def _package_sites() -> list[tuple[str, str, dict[str, object]]]:
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        module = importlib.import_module(f"mmproxy.{path.stem}")
        found.append((path.read_text(), path.stem, vars(module)))
    return found


def test_every_reason_a_metric_can_carry_is_declared() -> None:
    count = 0
    problems: list[str] = []
    for source, module, names in _package_sites():
        count += len(list(sites(source, module, names)))
        problems += undeclared(source, module, names)
    assert count >= 15, "the scan found too few call sites: has the code's shape changed?"
    assert problems == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("tcp", "metrics.header_error(Refusal.NO_FLOW)"),
        ("tcp", "Outcome('m', None, IDLE_TIMEOUT, IDLE_TIMEOUT)"),
        ("udp", "raise RefusedError(Refusal.STOPPING, 'stopping')"),
        ("daemon", "services.metrics.refused(Refusal.HEADER_TIMEOUT)"),
        ("dispatch", "self._dropped(Refusal.IDLE_TIMEOUT, 'm', '', sender)"),
    ],
)
def test_the_check_finds_an_undeclared_reason(module: str, source: str) -> None:
    names: dict[str, object] = {"IDLE_TIMEOUT": Refusal.IDLE_TIMEOUT}
    assert len(undeclared(source, module, names)) == 1


def test_stopping_during_a_header_is_declared() -> None:
    assert Refusal.STOPPING in HEADER


def test_refusals_and_parser_reasons_never_share_a_code() -> None:
    assert not {r.value for r in Refusal} & {r.value for r in Reason}
