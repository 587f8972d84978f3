"""Protocol version 1 of gpuq (schema/PROTOCOL.md): frames and msgpack headers.

The encoder writes the canonical form: keys in the order given (the order of
PROTOCOL.md's tables), integers in their smallest msgpack form, f32 argument
values as msgpack float 32 and every other float as float 64.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, Iterable, List, Optional, Union

import msgpack

CLIENT_PROTOCOL = b"GPUQ/1"
WORKER_PROTOCOL = b"GPUQW/2"

SCALAR_TYPES = ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64")
STATES = ("queued", "dispatched", "done", "failed", "canceled", "expired")
TERMINAL = ("done", "failed", "canceled", "expired")


class _F32(float):
    """A float that the encoder writes as msgpack float 32."""


def _pack(obj: object, out: List[bytes]) -> None:
    if obj is None:
        out.append(b"\xc0")
    elif obj is True:
        out.append(b"\xc3")
    elif obj is False:
        out.append(b"\xc2")
    elif isinstance(obj, int):
        out.append(_pack_int(obj))
    elif isinstance(obj, _F32):
        out.append(b"\xca" + struct.pack(">f", obj))
    elif isinstance(obj, float):
        out.append(b"\xcb" + struct.pack(">d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogateescape")
        out.append(_header(len(data), 0xA0, 31, b"\xd9", b"\xda", b"\xdb") + data)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        n = len(data)
        prefix = (b"\xc4" + bytes([n]) if n < 256 else
                  b"\xc5" + struct.pack(">H", n) if n < 65536 else b"\xc6" + struct.pack(">I", n))
        out.append(prefix + data)
    elif isinstance(obj, (list, tuple)):
        out.append(_header(len(obj), 0x90, 15, None, b"\xdc", b"\xdd"))
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        out.append(_header(len(obj), 0x80, 15, None, b"\xde", b"\xdf"))
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError("cannot encode %r" % (obj,))


def _header(n: int, fix: int, fix_max: int, m8: Optional[bytes], m16: bytes,
            m32: bytes) -> bytes:
    if n <= fix_max:
        return bytes([fix | n])
    if m8 is not None and n < 256:
        return m8 + bytes([n])
    if n < 65536:
        return m16 + struct.pack(">H", n)
    return m32 + struct.pack(">I", n)


def _pack_int(v: int) -> bytes:
    if v >= 0:
        if v < 128:
            return bytes([v])
        if v < 1 << 8:
            return b"\xcc" + bytes([v])
        if v < 1 << 16:
            return b"\xcd" + struct.pack(">H", v)
        if v < 1 << 32:
            return b"\xce" + struct.pack(">I", v)
        return b"\xcf" + struct.pack(">Q", v)
    if v >= -32:
        return struct.pack("b", v)
    if v >= -(1 << 7):
        return b"\xd0" + struct.pack(">b", v)
    if v >= -(1 << 15):
        return b"\xd1" + struct.pack(">h", v)
    if v >= -(1 << 31):
        return b"\xd2" + struct.pack(">i", v)
    return b"\xd3" + struct.pack(">q", v)


def _mark_f32(header: Dict[str, Any]) -> Dict[str, Any]:
    """Marks the values of f32 arguments, of a job and of its launches (a job
    of several launches), so that they encode as float 32."""
    job = header.get("job") if isinstance(header, dict) else None
    holders: List[Any] = [job, header]
    for holder in (job, header):
        if isinstance(holder, dict) and isinstance(holder.get("launches"), list):
            holders.extend(holder["launches"])
    for holder in holders:
        if isinstance(holder, dict) and isinstance(holder.get("args"), list):
            holder["args"] = [[t, _F32(v)] if t == "f32" else [t, v] for t, v in holder["args"]]
    return header


def encode(header: Dict[str, Any]) -> bytes:
    """The msgpack bytes of a header map (canonical form)."""
    out: List[bytes] = []
    _pack(_mark_f32(header), out)
    return b"".join(out)


def decode(data: Union[bytes, bytearray, memoryview]) -> Dict[str, Any]:
    """The header map of msgpack bytes; ValueError when it is not one map."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types
        raise ValueError("not a msgpack header: %s" % e) from e
    if not isinstance(obj, dict):
        raise ValueError("header is not a map")
    return obj


def pack_frames(frames: Iterable[Union[bytes, bytearray, memoryview]]) -> bytes:
    """A golden file: each frame as a little-endian u32 length, then its bytes."""
    return b"".join(struct.pack("<I", len(f)) + bytes(f) for f in frames)


def unpack_frames(data: bytes) -> List[bytes]:
    frames: List[bytes] = []
    off = 0
    while off < len(data):
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        frames.append(data[off:off + n])
        off += n
    return frames
