"""Sessions (PROTOCOL.md, "Sessions"): device memory that stays on the GPU
between launches, in a process that serves this tenant only, reached
directly over a socket of the GPU's host, or through the broker by a client
elsewhere (PROTOCOL.md, "Sessions through the broker"). Made by
gpuq.Client.session().

Every request is answered in the order made; launch_async() sends a launch
and returns a ticket for wait(). A call's error is its own (a bad handle, a
range outside a buffer, a compile error) and the session goes on; an Error
with code "session_lost" means it ended (a kernel fault or a kill in this
tenant's process on that GPU, its idle timeout, a close through the broker),
and every later call fails the same way."""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
import zmq

from gpuq import wire
from gpuq.client import (Buf, Error, In, InOut, Out, OutSpec, Scalar, Scratch, as_output,
                         in_bytes, launch_args)

PROTOCOL = wire.SESSION_PROTOCOL
Dim = Union[int, Sequence[int]]
Header = Dict[str, Any]
# The most bytes a request carries in one field (a msgpack bin): a write's
# data, each of a launch's inputs.
MAX_BIN = (1 << 32) - 1


def _check_bin(data: Any, what: str) -> None:
    """Error "too_large" for an array or bytes-like `data` of more than
    MAX_BIN bytes, before any of them is read or sent (as the C++ client);
    other data is checked once it is bytes."""
    if isinstance(data, np.ndarray):
        size = int(data.nbytes)
    else:
        try:
            size = memoryview(data).nbytes
        except TypeError:
            return
    if size > MAX_BIN:
        raise Error("too_large", "%s of %d bytes: a session request carries at most %d"
                    % (what, size, MAX_BIN))


def _dim3(d: Dim) -> List[int]:
    if isinstance(d, int):
        return [d, 1, 1]
    v = [int(x) for x in d]
    return v + [1] * (3 - len(v))


class Session:
    """A session's channel: the session process's socket, or, with `relay`
    (a DEALER to the broker of the session's own), the broker. Not
    thread-safe; a context manager that closes it."""

    def __init__(self, reply: Mapping[str, Any], timeout: float,
                 relay: Optional[Any] = None) -> None:
        self.id: int = reply["id"]
        self.device: str = reply.get("device", "")
        self._path: str = reply["path"]
        self._token: str = reply["token"]
        self.timeout = timeout
        self._rid = 0
        self._buf = bytearray()
        self._early: Dict[int, Header] = {}
        # Kernels by the handle the session's answer to their first launch
        # gave (PROTOCOL.md, "Sessions"): later launches name them by it.
        self._kernels: Dict[Tuple[Any, ...], int] = {}
        self._naming: Dict[int, Tuple[Any, ...]] = {}  # rid of a launch by source
        # A launch's out and inout arguments, by its rid: how to give back
        # each output (dtype and shape; None: bytes).
        self._outs: Dict[int, List[Optional[OutSpec]]] = {}
        self._lost: Optional[Error] = None
        self._closed = False
        self._sock: Optional[socket.socket] = None
        # Through the broker: each request a session_call, each answer its
        # reply (PROTOCOL.md, "Sessions through the broker").
        self._relay: Optional[Any] = relay
        if relay is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(reply["path"])
        except OSError as e:
            sock.close()
            raise Error("unavailable", "the session's process: %s" % e) from e
        self._sock = sock
        self._write({"op": "hello", "protocol": PROTOCOL, "session": self.id,
                     "token": reply["token"]})
        self._answer(0)

    # -------------------------------------------------------------- plumbing

    def _lose(self, e: Error) -> Error:
        if self._lost is None:
            self._lost = e
        self._naming.clear()
        self._outs.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._relay is not None:
            self._relay.close(0)
            self._relay = None
        return self._lost

    def _connected(self) -> bool:
        return self._sock is not None or self._relay is not None

    def _write(self, message: Header) -> None:
        if self._relay is not None:
            call = {"op": "session_call", "rid": message["rid"], "id": self.id,
                    "token": self._token}
            self._relay.send_multipart([wire.CLIENT_PROTOCOL, wire.encode(call),
                                        wire.encode(message)], copy=False)
            return
        body = wire.encode(message)
        data = struct.pack("<I", len(body)) + body
        assert self._sock is not None
        view = memoryview(data)
        while view:
            # Answers are read while the socket cannot take the request.
            r, w, _ = select.select([self._sock], [self._sock], [], self.timeout)
            if r:
                self._fill()
                if self._sock is None:
                    raise self._lost  # type: ignore[misc]
            if w:
                try:
                    sent = self._sock.send(view, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self._fill()
                    raise self._lose(Error("session_lost",
                                           "the session's process is gone: %s" % e)) from e
                view = view[sent:]
            elif not r:
                raise self._lose(Error("timeout", "the session's process takes no requests"))

    def _take(self, m: Header) -> None:
        """One answer from the session's process."""
        if m.get("op") == "error" and m.get("rid") == 0:
            self._lose(Error(m.get("code", "session_lost"), m.get("error", "")))
            return
        self._early[m["rid"]] = m
        key = self._naming.pop(m["rid"], None)
        if key is not None and m.get("op") == "done" and "kernel" in m:
            self._kernels[key] = int(m["kernel"])

    def _fill_from_broker(self) -> None:
        """Every reply waiting: a call's answer (the process's, relayed) or
        the broker's refusal of it."""
        while self._relay is not None:
            try:
                frames = self._relay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2 or frames[0] != wire.CLIENT_PROTOCOL:
                continue
            h = wire.decode(frames[1])
            if h.get("op") == "session_answer" and len(frames) == 3:
                self._take(wire.decode(frames[2]))
            elif h.get("op") == "error" and h.get("rid"):
                # The broker's refusal of this call: of the call alone (a
                # request it does not relay, or not now), else of the session,
                # which this client can no longer reach (not_found: the broker
                # no longer knows it).
                code = h.get("code", "internal")
                code = "session_lost" if code == "not_found" else code
                self._early[h["rid"]] = {"op": "error", "rid": h["rid"], "code": code,
                                         "error": h.get("error", "")}
                own = code in ("malformed", "too_large", "resource_exhausted",
                               "unknown_command")
                if not own and self._lost is None:
                    self._lost = Error(code, h.get("error", ""))

    def _readable(self, timeout: float) -> bool:
        if self._relay is not None:
            return bool(self._relay.poll(int(timeout * 1000) + 1))
        return bool(select.select([self._sock], [], [], timeout)[0])

    def _fill(self) -> None:
        """Takes what the socket holds, and every whole answer in it."""
        if self._relay is not None:
            self._fill_from_broker()
            return
        if self._sock is None:
            return
        try:
            chunk = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self._buf += chunk
        while len(self._buf) >= 4:
            (n,) = struct.unpack_from("<I", self._buf)
            if len(self._buf) < 4 + n:
                break
            m = wire.decode(bytes(self._buf[4:4 + n]))
            del self._buf[:4 + n]
            self._take(m)
            if self._sock is None:
                return
        if not chunk:
            self._lose(Error("session_lost", "the session's process ended (a kernel fault or a "
                                             "kill there ends its tenant's sessions on that "
                                             "GPU)"))

    def _answer(self, rid: int) -> Header:
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._early.pop(rid, None)
            if m is not None:
                if m["op"] == "error":
                    raise Error(m["code"], m["error"])
                return m
            if self._lost is not None:
                raise self._lost
            left = deadline - time.monotonic()
            if left <= 0 or not self._readable(left):
                raise Error("timeout", "no answer from the session in time")
            self._fill()

    def _send(self, message: Header) -> int:
        if self._lost is not None:
            raise self._lost
        self._rid += 1
        self._write(dict(op=message.pop("op"), rid=self._rid, **message))
        return self._rid

    def _call(self, message: Header) -> Header:
        return self._answer(self._send(message))

    # -------------------------------------------------------------- calls

    def alloc(self, nbytes: int) -> int:
        """A buffer of `nbytes` on the GPU, zero-filled: its handle."""
        return int(self._call({"op": "alloc", "size": int(nbytes)})["buffer"])

    def free(self, buffer: int) -> None:
        self._call({"op": "free", "buffer": int(buffer)})

    def write(self, buffer: int, data: Any, offset: int = 0) -> None:
        """Copies `data` (bytes, or any array: its bytes) into the buffer at
        `offset`. Error "too_large" for 4 GiB or more."""
        _check_bin(data, "a write")
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        _check_bin(raw, "a write")
        self._call({"op": "write", "buffer": int(buffer), "offset": int(offset), "data": raw})

    def read(self, buffer: int, nbytes: int, offset: int = 0,
             dtype: npt.DTypeLike = np.uint8) -> np.ndarray:
        """`nbytes` of the buffer from `offset`, as a numpy array of `dtype`."""
        m = self._call({"op": "read", "buffer": int(buffer), "offset": int(offset),
                        "size": int(nbytes)})
        return np.frombuffer(m.get("data", b""), dtype=dtype)

    def copy(self, dst: int, src: int, nbytes: int, dst_offset: int = 0,
             src_offset: int = 0) -> None:
        self._call({"op": "copy", "buffer": int(dst), "offset": int(dst_offset),
                    "src": int(src), "src_offset": int(src_offset), "size": int(nbytes)})

    def fill(self, buffer: int, value: int, nbytes: int, offset: int = 0) -> None:
        """Sets `nbytes` bytes from `offset` to `value` (a byte)."""
        self._call({"op": "fill", "buffer": int(buffer), "offset": int(offset),
                    "size": int(nbytes), "value": int(value)})

    def attach(self, region: Any) -> int:
        """Attaches a gpuq.Region (PROTOCOL.md, "Sessions", attach): the
        session's process maps its memory and page-locks it, so that
        write_from() and read_into() copy between it and buffers at the
        bus's speed, no bytes in messages. Its handle; attached until
        detach() or the session's end (the region must outlive that)."""
        fd = getattr(region, "_fd", None)
        if fd is None:
            raise ValueError("the region is closed")
        if self._relay is not None:
            raise Error("unavailable", "a session reached through the broker attaches no "
                                       "regions: they need a client on the GPU's host, "
                                       "connected directly")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(max(self.timeout, 60.0))
            sock.connect(self._path)
            body = wire.encode({"op": "attach", "protocol": PROTOCOL, "session": self.id,
                                "token": self._token, "size": int(region.size)})
            socket.send_fds(sock, [struct.pack("<I", len(body)) + body], [fd])
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack_from("<I", data)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    raise Error("unavailable", "the session's process closed the connection")
                data += chunk
        except OSError as e:
            raise Error("unavailable", "the session's process: %s" % e) from e
        finally:
            sock.close()
        m = wire.decode(data[4:4 + struct.unpack_from("<I", data)[0]])
        if m.get("op") == "error":
            raise Error(m.get("code", "internal"), m.get("error", ""))
        return int(m["region"])

    def detach(self, region: int) -> None:
        """Ends attached region `region`'s attachment, once the copies sent
        before this that use it have run; its handle is refused from then on."""
        self._call({"op": "detach", "region": int(region)})

    def write_from(self, buffer: int, region: int, nbytes: int, *, offset: int = 0,
                   region_offset: int = 0) -> None:
        """Bytes [region_offset, region_offset + nbytes) of attached region
        `region` into the buffer at `offset`."""
        if int(region) < 1:
            raise ValueError("no region %d: attach() gives handles from 1" % region)
        self._call({"op": "write", "buffer": int(buffer), "offset": int(offset),
                    "region": int(region), "region_offset": int(region_offset),
                    "size": int(nbytes)})

    def read_into(self, buffer: int, region: int, nbytes: int, *, offset: int = 0,
                  region_offset: int = 0) -> None:
        """The buffer's bytes [offset, offset + nbytes) into attached region
        `region` at `region_offset`: there when this returns."""
        if int(region) < 1:
            raise ValueError("no region %d: attach() gives handles from 1" % region)
        self._call({"op": "read", "buffer": int(buffer), "offset": int(offset),
                    "size": int(nbytes), "region": int(region),
                    "region_offset": int(region_offset)})

    def launch_async(self, source: str, entry: str, grid: Dim, block: Dim,
                     args: Sequence[Any], *, shared: int = 0,
                     options: Optional[Sequence[str]] = None,
                     headers: Optional[Mapping[str, str]] = None,
                     name_expression: bool = False, timed: bool = True) -> int:
        """Sends a launch without waiting: a ticket for wait(). Arguments are
        scalars (gpuq.u32(...), gpuq.f32(...)), gpuq.Buf(handle, offset)
        of this session's buffers, and buffers of the launch's own (see
        run(); their outputs come from wait_outputs()). timed=False: no CUDA
        events, and wait() gives 0. Error "too_large" for an input of 4 GiB
        or more."""
        options = list(options or [])
        key = (source, entry, bool(name_expression), tuple(options),
               tuple((headers or {}).items()))
        handle = self._kernels.get(key)
        m: Header = {"op": "launch"}
        if handle is not None:
            m["kernel"] = handle
        else:
            m.update(src=source, entry=entry)
            if name_expression:
                m["expr"] = True
            if options:
                m["opts"] = list(options)
            if headers:
                m["headers"] = [[k, v] for k, v in headers.items()]
        m["grid"] = _dim3(grid)
        m["block"] = _dim3(block)
        if shared:
            m["shared"] = int(shared)
        own = [a for a in args if isinstance(a, (In, Out, Scratch))]
        outs: List[Optional[OutSpec]] = []
        if own:
            # Buffers of the launch's own (PROTOCOL.md, "Sessions", launch).
            wire_args: List[Any] = []
            inputs: List[bytes] = []
            plain = [a for a in args if not isinstance(a, (In, Out, Scratch))]
            plain_wire = iter(launch_args(plain, "", "the session's buffers (by handle)"))
            for a in args:
                if isinstance(a, In):
                    _check_bin(a.data, "an input")
                    data, spec = in_bytes(a)
                    kind = "inout" if isinstance(a, InOut) else "in"
                    wire_args.append([kind, len(inputs)])
                    inputs.append(bytes(data))
                    _check_bin(inputs[-1], "an input")
                    if kind == "inout":
                        outs.append(spec)
                elif isinstance(a, Out):
                    wire_args.append(["out", a.nbytes])
                    outs.append((a.dtype, a.shape))
                elif isinstance(a, Scratch):
                    wire_args.append(["scratch", a.nbytes])
                else:
                    wire_args.append(next(plain_wire))
            m["args"] = wire_args
            if inputs:
                m["inputs"] = inputs
        else:
            m["args"] = launch_args(args, "", "the session's buffers (by handle)")
        if not timed:
            m["untimed"] = True
        rid = self._send(m)
        if handle is None:
            self._naming[rid] = key
        if outs:
            self._outs[rid] = outs
        return rid

    def wait(self, ticket: int) -> int:
        """The end of the launch of `ticket`: its time on the GPU, in ns (0
        for an untimed launch)."""
        self._outs.pop(ticket, None)
        return int(self._answer(ticket).get("kernel_ns", 0))

    def launch(self, source: str, entry: str, grid: Dim, block: Dim,
               args: Sequence[Union[Scalar, Buf]], **kw: Any) -> int:
        """Runs a kernel and waits for it: its time on the GPU, in ns."""
        return self.wait(self.launch_async(source, entry, grid, block, args, **kw))

    def wait_outputs(self, ticket: int) -> List[Any]:
        """The end of the launch of `ticket`: the bytes of its own out and
        inout buffers, in argument order (numpy arrays of their dtype and
        shape where an array or gpuq.Out said them, else bytes)."""
        specs = self._outs.pop(ticket, [])
        got = self._answer(ticket).get("outputs", [])
        if len(got) != len(specs):
            raise Error("internal", "the session answered %d outputs for %d out and inout "
                        "arguments" % (len(got), len(specs)))
        return [as_output(data, spec) for data, spec in zip(got, specs)]

    def run(self, source: str, entry: str, grid: Dim, block: Dim, args: Sequence[Any],
            **kw: Any) -> List[Any]:
        """Runs a kernel whose arguments may include buffers of its own, and
        waits for it: gpuq.In(array or bytes) and gpuq.InOut(...) go to the
        GPU before it, gpuq.Out(nbytes or dtype and shape) starts as zeros,
        gpuq.Scratch(nbytes) never leaves the GPU; each is device memory for
        this launch alone, freed after it. Besides them: scalars and
        gpuq.Buf of the session's buffers. Returns the out and inout
        buffers' bytes after it, in argument order (wait_outputs)."""
        return self.wait_outputs(self.launch_async(source, entry, grid, block, args, **kw))

    def close(self) -> None:
        """Ends the session: its buffers are freed."""
        if self._closed or not self._connected():
            return
        try:
            self._call({"op": "close"})
        finally:
            self._closed = True
            self._lose(Error("session_lost", "the session is closed"))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except Error:
            pass
