"""Coverage-guided fuzzing of the PROXY header parser with atheris (libFuzzer).

The invariant: whatever the bytes, and however a stream splits them, the
parser answers a header (Parsed), "need more" (NeedMore) or its own
HeaderError, and nothing else.  Each input is checked three ways:

* stream, whole: ``parse(data)``; a parsed header re-encodes to bytes that
  parse to the same header;
* stream, split: the same bytes fed in pieces (cut points derived from the
  input, so a failure reproduces from the crash file alone) give NeedMore
  until the whole input's answer, and then that answer; every prefix of a
  refused input that is refused is refused for the same reason;
* datagram: ``parse_complete(data)`` gives the same header, or HeaderError
  (``incomplete`` where the stream would wait for more).

The test suite runs it for a few seconds (tests/unit/test_fuzz.py).  A longer
run, from the repository root, with atheris installed (the ``test`` extra):

    .venv/bin/python -m tests.fuzz.fuzz_protocol -seed_corpus -max_total_time=600

``-seed_corpus`` (or ``-seed_corpus=DIR``) first writes every vector of the
unit corpus into ``.fuzz-corpus/`` (git-ignored; or DIR) as the starting
point.  Any other argument goes to libFuzzer (``-runs=N``, ``-jobs=N``,
``-artifact_prefix=DIR/``...).
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import sys
import zlib

import atheris

with atheris.instrument_imports():
    from mmproxy.errors import HeaderError, Reason
    from mmproxy.protocol import NeedMore, Parsed, ProxyHeader, encode, parse, parse_complete
    from mmproxy.tlv import Crc32c

CORPUS = pathlib.Path(__file__).resolve().parents[2] / ".fuzz-corpus"
MAX_INPUT = 600  # longer than any header the prefix checks need to see

Outcome = NeedMore | Parsed | HeaderError


def _outcome(data: bytes) -> Outcome:
    try:
        return parse(data)
    except HeaderError as error:
        return error


def _same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, HeaderError) and isinstance(b, HeaderError):
        return a.reason is b.reason
    return a == b


def _without_crc_values(header: ProxyHeader) -> ProxyHeader:
    """The header with CRC32C values zeroed: encode() recomputes them."""
    tlvs = tuple(Crc32c() if isinstance(t, Crc32c) else t for t in header.tlvs)
    return dataclasses.replace(header, tlvs=tlvs)


def _check_split(data: bytes, whole: Outcome) -> None:
    """Feed ``data`` in pieces: NeedMore until the answer for the whole, then that answer."""
    rng = random.Random(zlib.crc32(data))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 9))))
    buffer = bytearray()
    decided = False
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        buffer += data[start:end]
        now = _outcome(buffer)
        if decided or not isinstance(now, NeedMore):
            assert _same(now, whole), (data, cuts, len(buffer), now, whole)
            decided = True
    assert _same(_outcome(buffer), whole)


def _check_datagram(data: bytes, whole: Outcome) -> None:
    try:
        complete: Parsed | HeaderError = parse_complete(data)
    except HeaderError as error:
        complete = error
    if isinstance(whole, NeedMore):
        assert isinstance(complete, HeaderError), (data, complete)
        assert complete.reason is Reason.INCOMPLETE, (data, complete)
    else:
        assert _same(complete, whole), (data, complete, whole)


def check(data: bytes) -> None:
    data = data[:MAX_INPUT]
    whole = _outcome(data)  # anything but these three types propagates: a crash
    assert isinstance(whole, NeedMore | Parsed | HeaderError), whole
    _check_datagram(data, whole)
    if len(data) > 1:
        _check_split(data, whole)
    if isinstance(whole, Parsed):
        assert 0 < whole.consumed <= len(data)
        again = parse(encode(whole.header))
        assert isinstance(again, Parsed), again
        assert _without_crc_values(again.header) == _without_crc_values(whole.header)
        return
    if isinstance(whole, HeaderError):
        for length in range(len(data) + 1):
            first = _outcome(data[:length])
            if isinstance(first, HeaderError):
                assert first.reason is whole.reason, (data, first, whole)
                return
        raise AssertionError(f"{data!r}: refused whole but no prefix was refused")
    assert whole.at_least >= 1


def seed(directory: pathlib.Path) -> None:
    """Write the unit tests' corpus vectors into ``directory``, one file each."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
    from corpus import INVALID, VALID  # the unit tests' vectors

    directory.mkdir(parents=True, exist_ok=True)
    for vector in (*VALID, *INVALID):
        (directory / vector.id).write_bytes(vector.data[:MAX_INPUT])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)
    for arg in list(args):
        if arg == "-seed_corpus" or arg.startswith("-seed_corpus="):
            args.remove(arg)
            directory = pathlib.Path(arg.partition("=")[2] or CORPUS)
            seed(directory)
            args.append(str(directory))
    atheris.Setup(args, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
