"""Receiving a zmq message frame by frame, copying only the small ones.

``recv_message(sock, copied)`` returns the frames of one waiting message (zmq.Again if
none): those whose index is in ``copied`` as bytes (a routing id, a kind, a msgpack
body), the others as zmq Frames, whose memory is zmq's receive buffer, given back when
the last reference goes (a graph file or a large config is never copied again on
receipt). It uses plain ``recv`` with DONTWAIT and RCVMORE: pyzmq's recv_multipart
builds flag enums per call.
"""

from __future__ import annotations

import zmq

_DONTWAIT, _RCVMORE = int(zmq.DONTWAIT), int(zmq.RCVMORE)


def recv_message(sock, copied: range) -> list:
    frames = [sock.recv(_DONTWAIT, copy=0 in copied)]
    while sock.getsockopt(_RCVMORE):
        frames.append(sock.recv(_DONTWAIT, copy=len(frames) in copied))
    return frames
