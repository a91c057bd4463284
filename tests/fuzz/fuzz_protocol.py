"""Coverage-guided fuzzing of the PROXY header parser with atheris (libFuzzer).

Not part of the test suite (pytest does not collect this file, and atheris
is not a test dependency).  Run it by hand after changing the parser:

    python3 -m venv /tmp/fuzz && /tmp/fuzz/bin/pip install atheris -e .
    /tmp/fuzz/bin/python tests/fuzz/fuzz_protocol.py -seed_corpus -max_total_time=600

``-seed_corpus`` first writes every vector of the unit corpus into
``.fuzz-corpus/`` (git-ignored) as a starting point.  Each input is checked
for the same invariants as the property tests: parse() answers NeedMore or
Parsed or raises HeaderError, nothing else; a parsed header re-encodes to
bytes that parse to the same header; and a refusal carries the same reason
when the bytes arrive one at a time.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import atheris

with atheris.instrument_imports():
    from mmproxy.errors import HeaderError
    from mmproxy.protocol import NeedMore, Parsed, ProxyHeader, encode, parse
    from mmproxy.tlv import Crc32c

CORPUS = pathlib.Path(__file__).resolve().parents[2] / ".fuzz-corpus"
MAX_INPUT = 600  # longer than any header the byte-by-byte check needs to see


def _outcome(data: bytes) -> NeedMore | Parsed | HeaderError:
    try:
        return parse(data)
    except HeaderError as error:
        return error


def _without_crc_values(header: ProxyHeader) -> ProxyHeader:
    """The header with CRC32C values zeroed: encode() recomputes them."""
    tlvs = tuple(Crc32c() if isinstance(t, Crc32c) else t for t in header.tlvs)
    return dataclasses.replace(header, tlvs=tlvs)


def check(data: bytes) -> None:
    data = data[:MAX_INPUT]
    result = _outcome(data)
    if isinstance(result, Parsed):
        again = parse(encode(result.header))
        assert isinstance(again, Parsed), again
        assert _without_crc_values(again.header) == _without_crc_values(result.header)
        return
    if isinstance(result, HeaderError):
        for length in range(len(data) + 1):
            first = _outcome(data[:length])
            if isinstance(first, HeaderError):
                assert first.reason is result.reason, (data, first, result)
                return
        raise AssertionError(f"{data!r}: refused whole but no prefix was refused")
    assert isinstance(result, NeedMore)
    assert result.at_least >= 1


def _seed() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
    from corpus import INVALID, VALID  # the unit tests' vectors

    CORPUS.mkdir(exist_ok=True)
    for vector in (*VALID, *INVALID):
        (CORPUS / vector.id).write_bytes(vector.data[:MAX_INPUT])


def main() -> None:
    argv = list(sys.argv)
    if "-seed_corpus" in argv:
        argv.remove("-seed_corpus")
        _seed()
        argv.append(str(CORPUS))
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
