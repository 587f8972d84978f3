"""Protocol version 1 of gpuq (schema/PROTOCOL.md): frames and msgpack headers.

The encoder writes the canonical form: keys in the order given (the order of
PROTOCOL.md's tables), integers in their smallest msgpack form, f32 argument
values as msgpack float 32 and every other float as float 64.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import msgpack

CLIENT_PROTOCOL = b"GPUQ/1"
WORKER_PROTOCOL = b"GPUQW/2"
# The region channel's protocol (PROTOCOL.md, "Regions"): never a frame, the
# `protocol` field of the channel's hello.
REGION_PROTOCOL = "GPUQR/1"
# The session channel (PROTOCOL.md, "Sessions"): named in its hello.
SESSION_PROTOCOL = "GPUQS/1"

SCALAR_TYPES = ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64")
RANGE_TYPES = ("in", "out", "inout")
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


def region_arg(type_: str, region: int, offset: int, size: int) -> List[Any]:
    """An `in`, `out` or `inout` argument (or buffer) naming bytes
    [offset, offset + size) of a registered region: [type, {region, offset,
    size}], keys in that order."""
    if type_ not in RANGE_TYPES:
        raise ValueError("a range is an argument of type in, out or inout, not %r" % (type_,))
    for name, v in (("region", region), ("offset", offset), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise ValueError("a range's %s is a u64, not %r" % (name, v))
    return [type_, {"region": region, "offset": offset, "size": size}]


# The region channel (PROTOCOL.md, "Regions"): one msgpack map a packet.
REGION_MESSAGE_MAX = 4096
REGION_OPS = ("hello", "register", "unregister", "registered", "unregistered", "error",
              "region", "drop")
# The keys of every region message, in the order they are written.
_REGION_KEYS = ("op", "rid", "protocol", "worker", "token", "tenant", "region", "size", "code",
                "error")
# By op: (required fields, optional fields).
_REGION_FIELDS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "hello": (("protocol",), ("worker", "token")),
    "register": (("rid", "size"), ("tenant",)),
    "unregister": (("rid", "region"), ()),
    "registered": (("rid", "region", "size"), ()),
    "unregistered": (("rid", "region"), ()),
    "error": (("rid", "code", "error"), ()),
    "region": (("region", "size"), ()),
    "drop": (("region",), ()),
}
_REGION_UINTS = ("rid", "region", "size")
_REGION_STRS = ("protocol", "token", "tenant", "code", "error")


def _check_region_message(m: Mapping[str, Any]) -> str:
    """The op of region message `m`; ValueError when the message is not one."""
    op = m.get("op")
    if op not in _REGION_FIELDS:
        raise ValueError("not a region message op: %r" % (op,))
    required, optional = _REGION_FIELDS[op]
    for k, v in m.items():
        if k == "op":
            continue
        if k not in required and k not in optional:
            raise ValueError("unknown field %r in region message %r" % (k, op))
        if k in _REGION_UINTS and (isinstance(v, bool) or not isinstance(v, int) or
                                   not 0 <= v < 1 << 64):
            raise ValueError("%s of region message %r is a u64, not %r" % (k, op, v))
        if k in _REGION_STRS and not isinstance(v, str):
            raise ValueError("%s of region message %r is a str, not %r" % (k, op, v))
        if k == "worker" and not isinstance(v, bool):
            raise ValueError("worker of region message %r is a bool, not %r" % (op, v))
    for k in required:
        if k not in m:
            raise ValueError("%s is required in region message %r" % (k, op))
    if m.get("code") == "ok":
        raise ValueError("'ok' is not a failure code")
    return str(op)


def encode_region(message: Mapping[str, Any]) -> bytes:
    """The msgpack bytes of a region channel message (canonical form: keys in
    the order of _REGION_KEYS, `worker` only when true, `token` and `tenant`
    only when not empty); ValueError when it is not a region message."""
    _check_region_message(message)
    m: Dict[str, Any] = {}
    for k in _REGION_KEYS:
        if k not in message:
            continue
        v = message[k]
        if (k == "worker" and not v) or (k in ("token", "tenant") and not v):
            continue
        m[k] = v
    data = encode(m)
    if len(data) > REGION_MESSAGE_MAX:
        raise ValueError("a region message is at most %d bytes" % REGION_MESSAGE_MAX)
    return data


def decode_region(data: Union[bytes, bytearray, memoryview]) -> Dict[str, Any]:
    """The map of a region channel message; ValueError when it is not one."""
    if len(data) > REGION_MESSAGE_MAX:
        raise ValueError("a region message is at most %d bytes" % REGION_MESSAGE_MAX)
    m = decode(data)
    _check_region_message(m)
    return m
