"""Receiving a zmq message frame by frame, copying only the small ones; sending one.

``recv_message(sock, copied)`` returns the frames of one waiting message (zmq.Again if
none): those whose index is in ``copied`` as bytes (a routing id, a kind, a msgpack
body), the others as zmq Frames, whose memory is zmq's receive buffer, given back when
the last reference goes (a graph file or a large config is never copied again on
receipt). It uses plain ``recv`` with DONTWAIT and each Frame's ``more``: pyzmq's
recv_multipart builds flag enums per call. ``send_message(sock, frames)`` sends one message with
plain int flags (pyzmq's send_multipart combines enum flags for every frame).
"""

from __future__ import annotations

import zmq

_DONTWAIT, _SNDMORE = int(zmq.DONTWAIT), int(zmq.SNDMORE)
EVERY = range(1 << 30)   # (``copied``: every frame as bytes)


def recv_message(sock, copied: range) -> list:
    # (a Frame says whether more follow: asking the socket for RCVMORE makes an enum per frame)
    frame = sock.recv(_DONTWAIT, copy=False)
    frames = [frame.bytes if 0 in copied else frame]
    while frame.more:
        frame = sock.recv(_DONTWAIT, copy=False)
        frames.append(frame.bytes if len(frames) in copied else frame)
    return frames


def send_message(sock, frames: list, dontwait: bool = False, copy: bool = True) -> None:
    """Send the frames of one message (zmq.Again with ``dontwait`` when it cannot go now)."""
    end = _DONTWAIT if dontwait else 0
    last = len(frames) - 1
    for k, frame in enumerate(frames):
        sock.send(frame, end if k == last else end | _SNDMORE, copy=copy)
