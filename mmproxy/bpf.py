"""bpf(2) through ctypes, and the one program the kernel relay needs, assembled here.

No compiler at install or run time: the program is a few instructions written with
named opcodes (:func:`redirect_program`), encoded to the kernel's 8-byte ``bpf_insn``
layout (:func:`encode`), and loaded with the verifier's log kept for the error message
when the kernel refuses it.  Only what :mod:`mmproxy.sockmap` uses is wrapped: create a
SOCKHASH, update and delete its elements, load an SK_SKB program, attach it to the map.

The program keys the map by **socket cookie** (``bpf_get_socket_cookie``), not by the
skb's address fields: every socket is stored under its partner's cookie, so the lookup
for a segment arriving on socket A finds B and vice versa.  That sidesteps the address
encodings of ``__sk_buff`` for sk_skb programs (``remote_port`` is a u32 with the port,
network order, in its *upper* 16 bits; IPv4-mapped peers appear in the IPv6 fields), which
a wrong guess turns into a lookup miss.  A miss returns SK_PASS: the data stays queued on
the socket that received it instead of being dropped.  An empty skb (a FIN alone) is dropped:
redirected or passed, it made the psock report EPIPE on a healthy connection, and TCP has
already recorded the FIN, which the relay sees as EPOLLRDHUP.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

# ----------------------------------------------------------------------- instruction set
# Classes (low 3 bits of the opcode).
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_STX = 0x03
BPF_ALU64 = 0x07
BPF_JMP = 0x05
# Sizes (loads and stores).
BPF_W = 0x00
BPF_DW = 0x18
# Modes.
BPF_IMM = 0x00
BPF_MEM = 0x60
# ALU/JMP operations and operand source.
BPF_ADD = 0x00
BPF_MOV = 0xB0
BPF_JEQ = 0x10
BPF_JNE = 0x50
BPF_CALL = 0x80
BPF_EXIT = 0x90
BPF_K = 0x00  # immediate operand
BPF_X = 0x08  # register operand

BPF_PSEUDO_MAP_FD = 1  # src_reg of a 64-bit load: imm is a map fd the kernel resolves

# Registers: R0 return value, R1-R5 arguments (clobbered by calls), R6-R9 kept, R10 frame.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Helper functions (include/uapi/linux/bpf.h, enum bpf_func_id).
FUNC_GET_SOCKET_COOKIE = 46
FUNC_SK_REDIRECT_HASH = 72

SK_DROP = 0
SK_PASS = 1

SKB_LEN = 0  # offsetof(struct __sk_buff, len)


@dataclass(frozen=True, slots=True)
class Insn:
    """One ``struct bpf_insn``: opcode, destination and source registers, offset, immediate."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


def mov64_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)


def mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm=imm)


def add64_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_ADD | BPF_K, dst, imm=imm)


def store64(base: int, off: int, src: int) -> Insn:
    """``*(u64 *)(base + off) = src``."""
    return Insn(BPF_STX | BPF_MEM | BPF_DW, base, src, off)


def load32(dst: int, base: int, off: int) -> Insn:
    """``dst = *(u32 *)(base + off)``."""
    return Insn(BPF_LDX | BPF_MEM | BPF_W, dst, base, off)


def jeq_imm(dst: int, imm: int, skip: int) -> Insn:
    """Skip ``skip`` instructions when ``dst == imm``."""
    return Insn(BPF_JMP | BPF_JEQ | BPF_K, dst, off=skip, imm=imm)


def jne_imm(dst: int, imm: int, skip: int) -> Insn:
    """Skip ``skip`` instructions when ``dst != imm``."""
    return Insn(BPF_JMP | BPF_JNE | BPF_K, dst, off=skip, imm=imm)


def load_map_fd(dst: int, map_fd: int) -> tuple[Insn, Insn]:
    """``dst = map`` (a 64-bit immediate load: two instruction slots)."""
    return (
        Insn(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, imm=map_fd),
        Insn(0),
    )


def call(func: int) -> Insn:
    return Insn(BPF_JMP | BPF_CALL, imm=func)


def exit_insn() -> Insn:
    return Insn(BPF_JMP | BPF_EXIT)


def redirect_program(map_fd: int) -> list[Insn]:
    """The SK_SKB verdict: send each segment out of the socket stored under this one's cookie.

    Empty skbs are dropped first (see the module's docstring).

    ``bpf_sk_redirect_hash`` returns SK_PASS when the key was found (the skb then goes
    to that socket's send side) and SK_DROP on a miss, which we turn into SK_PASS so that
    the data stays readable here rather than vanish.
    """
    return [
        load32(R2, R1, SKB_LEN),
        mov64_imm(R0, SK_DROP),
        jeq_imm(R2, 0, 12),  # an empty skb (a bare FIN): dropped, to the exit
        mov64_reg(R6, R1),  # keep the context: calls clobber R1-R5
        call(FUNC_GET_SOCKET_COOKIE),  # R0 = this socket's cookie
        store64(R10, -8, R0),  # the key lives on the stack
        mov64_reg(R1, R6),
        *load_map_fd(R2, map_fd),
        mov64_reg(R3, R10),
        add64_imm(R3, -8),  # R3 = &key
        mov64_imm(R4, 0),  # flags 0: egress, out of the partner socket
        call(FUNC_SK_REDIRECT_HASH),
        jne_imm(R0, SK_DROP, 1),
        mov64_imm(R0, SK_PASS),  # no partner in the map: leave the data where it is
        exit_insn(),
    ]


def encode(program: list[Insn]) -> bytes:
    """The program as the kernel reads it."""
    return b"".join(insn.encode() for insn in program)


# ----------------------------------------------------------------------- the system call
_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8

BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
# enum bpf_attach_type
BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_SKB_VERDICT = 38

BPF_ANY = 0  # map update: create or replace

ATTR_SIZE = 128  # bytes; larger than every field used here, the tail stays zero
LOG_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """bpf(2) failed; ``str()`` names the command, and for a refused program the verifier's log."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        raise BpfError(
            errno.ENOSYS, f"bpf(2): no system call number known for {platform.machine()}"
        )
    result = int(_libc.syscall(number, cmd, attr, ATTR_SIZE))
    if result < 0:
        code = ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return result


def _attr(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)


def create_sockhash(max_entries: int, key_size: int = 8) -> int:
    """A SOCKHASH map (values are socket fds); returns its descriptor (close-on-exec)."""
    name = b"mmproxy_pairs".ljust(16, b"\0")
    data = struct.pack(
        "<IIIIIII16s", BPF_MAP_TYPE_SOCKHASH, key_size, 4, max_entries, 0, 0, 0, name
    )
    return _bpf(BPF_MAP_CREATE, _attr(data), "create the socket map")


def update(map_fd: int, key: bytes, sock_fd: int) -> None:
    """Store ``sock_fd`` under ``key``; raises BpfError (E2BIG when full, ENOMEM, ...)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value = ctypes.c_uint32(sock_fd)
    data = struct.pack(
        "<IIQQQ",
        map_fd,
        0,
        ctypes.addressof(key_buf),
        ctypes.addressof(value),
        BPF_ANY,
    )
    _bpf(BPF_MAP_UPDATE_ELEM, _attr(data), "add a socket to the map")


def delete(map_fd: int, key: bytes) -> None:
    """Remove ``key``; raises BpfError (ENOENT when it is not there)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    data = struct.pack("<IIQ", map_fd, 0, ctypes.addressof(key_buf))
    _bpf(BPF_MAP_DELETE_ELEM, _attr(data), "remove a socket from the map")


def load_program(program: list[Insn], prog_type: int = BPF_PROG_TYPE_SK_SKB) -> int:
    """Load ``program`` through the verifier; returns its descriptor.

    On refusal the BpfError carries the verifier's log (the program is loaded a second
    time with the log on only then, so a successful load costs no log buffer).
    """
    code = encode(program)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")

    def attempt(log_level: int, log_buf: ctypes.Array[ctypes.c_char] | None) -> int:
        data = struct.pack(
            "<IIQQIIQII16s",
            prog_type,
            len(program),
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            log_level,
            LOG_SIZE if log_buf is not None else 0,
            ctypes.addressof(log_buf) if log_buf is not None else 0,
            0,
            0,
            b"mmproxy_relay".ljust(16, b"\0"),
        )
        return _bpf(BPF_PROG_LOAD, _attr(data), "load the relay program")

    try:
        return attempt(0, None)
    except BpfError as error:
        if error.errno not in (errno.EINVAL, errno.EACCES):
            raise  # not the verifier: EPERM, ENOSYS, ...
    log_buf = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return attempt(1, log_buf)
    except BpfError as error:
        raise BpfError(
            error.errno,
            f"{error.strerror}; verifier: {log_buf.value.decode(errors='replace').strip()}",
        ) from None


def attach(map_fd: int, prog_fd: int, attach_type: int = BPF_SK_SKB_STREAM_VERDICT) -> None:
    """Attach ``prog_fd`` to ``map_fd``: every socket in the map runs it."""
    data = struct.pack("<IIII", map_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_ATTACH, _attr(data), "attach the relay program to the map")
