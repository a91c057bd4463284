"""The kernel relay's program: its encoding (plain), and the verifier's view of it (root)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from mmproxy import bpf, sockmap
from mmproxy.metrics import KERNEL_FALLBACK_REASONS


def test_instruction_encoding_matches_struct_bpf_insn() -> None:
    """code u8, dst:4 | src:4 << 4, off s16, imm s32, little endian."""
    assert bpf.mov64_reg(bpf.R6, bpf.R1).encode() == bytes([0xBF, 0x16, 0, 0, 0, 0, 0, 0])
    assert bpf.mov64_imm(bpf.R0, 1).encode() == bytes([0xB7, 0x00, 0, 0, 1, 0, 0, 0])
    assert bpf.add64_imm(bpf.R3, -8).encode() == bytes([0x07, 0x03, 0, 0]) + struct.pack("<i", -8)
    assert bpf.store64(bpf.R10, -8, bpf.R0).encode() == bytes([0x7B, 0x0A]) + struct.pack(
        "<hi", -8, 0
    )
    assert bpf.load32(bpf.R2, bpf.R1, 0).encode() == bytes([0x61, 0x12, 0, 0, 0, 0, 0, 0])
    assert bpf.jeq_imm(bpf.R2, 0, 12).encode() == bytes([0x15, 0x02, 12, 0, 0, 0, 0, 0])
    assert bpf.call(72).encode() == bytes([0x85, 0, 0, 0, 72, 0, 0, 0])
    assert bpf.exit_insn().encode() == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    first, second = bpf.load_map_fd(bpf.R2, 7)
    assert first.encode() == bytes([0x18, 0x12, 0, 0, 7, 0, 0, 0])  # src 1: a map fd
    assert second.encode() == bytes(8)


def test_redirect_program_shape() -> None:
    """Empty skbs dropped, the cookie as key, the redirect to the partner, a miss kept."""
    program = bpf.redirect_program(42)
    code = bpf.encode(program)
    assert len(code) == 8 * len(program)
    assert program[-1] == bpf.exit_insn()
    calls = [insn.imm for insn in program if insn.code == bpf.BPF_JMP | bpf.BPF_CALL]
    assert calls == [bpf.FUNC_GET_SOCKET_COOKIE, bpf.FUNC_SK_REDIRECT_HASH]
    loads = [insn for insn in program if insn.code == bpf.BPF_LD | bpf.BPF_DW | bpf.BPF_IMM]
    assert [(insn.src, insn.imm) for insn in loads] == [(bpf.BPF_PSEUDO_MAP_FD, 42)]
    # The empty-skb jump lands on the exit with R0 = SK_DROP still set.
    jump = next(i for i, insn in enumerate(program) if insn.code == bpf.BPF_JMP | bpf.BPF_JEQ)
    assert program[jump - 1] == bpf.mov64_imm(bpf.R0, bpf.SK_DROP)
    assert program[jump + 1 + program[jump].off] == bpf.exit_insn()
    # A miss (SK_DROP from the helper) becomes SK_PASS just before the exit.
    assert program[-2] == bpf.mov64_imm(bpf.R0, bpf.SK_PASS)
    assert program[-3] == bpf.jne_imm(bpf.R0, bpf.SK_DROP, 1)


def test_every_fallback_reason_is_a_metrics_label() -> None:
    assert {sockmap.FALLBACK_INSERT, sockmap.FALLBACK_BUSY, sockmap.FALLBACK_ENDED} == set(
        KERNEL_FALLBACK_REASONS
    )


root = pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root (CI runs as root)")


@root
def test_the_verifier_accepts_the_program_and_it_attaches() -> None:
    targets = bpf.create_sockhash(16)
    verdicts = bpf.create_sockhash(16)
    try:
        program = bpf.load_program(bpf.redirect_program(targets))
        try:
            bpf.attach(verdicts, program, bpf.BPF_SK_SKB_STREAM_VERDICT)
        finally:
            os.close(program)
    finally:
        os.close(targets)
        os.close(verdicts)


@root
def test_a_refused_program_reports_the_verifier_log() -> None:
    broken = [bpf.mov64_reg(bpf.R0, bpf.R7), bpf.exit_insn()]  # R7 was never written
    with pytest.raises(bpf.BpfError) as caught:
        bpf.load_program(broken)
    assert caught.value.errno in (errno.EACCES, errno.EINVAL)
    assert "verifier:" in str(caught.value)
    assert "R7" in str(caught.value)
