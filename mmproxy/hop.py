"""Small messages moved by whoever watches a parked direction, without waking a relay thread.

A parked relay direction (:mod:`mmproxy.parking`) used to go back to a pool worker for every
message its source received: two thread hand-offs per request and per answer, which is what
a connection's setup and a ping-pong hop cost (bench/README.md, issue 13).  :func:`move`
instead tries the move right where the readiness was seen, without ever blocking: one
``recv_into`` and one ``send``, both ``MSG_DONTWAIT`` (the sockets stay blocking for
splice's threads).  What it cannot finish that way it leaves to a thread:

* a read that fills the buffer is bulk: what was read is sent (or left pending) and the
  direction goes to a thread, which splices the rest;
* a send that takes less than what was read (the destination's buffer is full): the rest
  waits in :attr:`~mmproxy.relay.Pair.pending`, which the direction's thread sends first,
  blocking as a relay thread may.

An end of stream is relayed here too (``shutdown(SHUT_WR)`` of the destination), so a
request, its answer and both closes need no thread at all.  Nothing is read unless it can be
accounted for: every byte read is either sent and counted, or pending (unless the pair
fails, which loses what was in flight, as a failed splice loses its pipe).
"""

from __future__ import annotations

import enum
import errno
import socket

from mmproxy.relay import FORWARD, Pair


class Hop(enum.Enum):
    """What :func:`move` did."""

    MOVED = "moved"  # a small read went out whole (or nothing was there): keep waiting
    BUSY = "busy"  # bulk, or a slow reader: the direction needs a thread (bytes may be pending)
    ENDED = "ended"  # the source ended and the half-close was relayed: the direction is over


def move(pair: Pair, side: int, buffer: memoryview | bytearray) -> Hop:
    """Move what direction ``side`` of ``pair`` has now, through ``buffer``, without blocking.

    Call only while the direction is parked (no thread runs it) and has nothing pending.
    Raises OSError when either socket fails (the pair then ends, as when a splice fails).
    ``buffer`` is best a memoryview (the lot's is): slicing it then copies nothing.
    """
    if side == FORWARD:  # attributes, not pair.source(): this runs for every message
        src, dst, counter = pair.client, pair.upstream, pair.to_target
    else:
        src, dst, counter = pair.upstream, pair.client, pair.to_client
    try:
        received = src.recv_into(buffer, 0, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return Hop.MOVED  # woken with nothing to read
    if not received:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise
        return Hop.ENDED
    data = buffer[:received]
    try:
        sent = dst.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    counter[0] += sent
    pair.touch(side)
    if sent < received:
        pair.pending[side] = bytes(data[sent:])
        return Hop.BUSY
    return Hop.BUSY if received == len(buffer) else Hop.MOVED
