"""Reading a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) from user space, through mmap.

The kernel's layout (kernel/bpf/ringbuf.c): the first page holds the consumer position
(ours to write), the second the producer position (the kernel's), then the data area,
mapped twice in a row so that a record never wraps.  Each record is an 8-byte header
(a u32 length whose top two bits say "still being written" and "discarded", then a u32
the kernel uses) followed by the sample, padded to 8 bytes.  The descriptor polls readable
when records wait.
"""

from __future__ import annotations

import mmap
import struct

from mmproxy import bpf

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8


class RingBuffer:
    """One ring buffer map and the mappings to read it; :meth:`close` releases all three."""

    def __init__(self, size: int) -> None:
        """``size`` is rounded up to a power of two pages."""
        page = mmap.PAGESIZE
        self.size = page
        while self.size < size:
            self.size *= 2
        self.fd = bpf.create_map(bpf.BPF_MAP_TYPE_RINGBUF, 0, 0, self.size, b"mmproxy_events")
        try:
            self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, offset=0)
            self._producer = mmap.mmap(
                self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError:
            bpf.close_quietly(self.fd)
            raise
        self._page = page

    def read(self) -> list[bytes]:
        """The samples written since the last call, oldest first; their room is freed."""
        samples: list[bytes] = []
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        while consumer < producer:
            at = self._page + (consumer & (self.size - 1))
            length = struct.unpack_from("<I", self._producer, at)[0]
            if length & _BUSY:
                break  # reserved but not committed yet: the next wake-up brings it
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                samples.append(self._producer[at + _HEADER : at + _HEADER + size])
            consumer += (size + _HEADER + 7) & ~7
        struct.pack_into("<Q", self._consumer, 0, consumer)
        return samples

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        bpf.close_quietly(self.fd)
