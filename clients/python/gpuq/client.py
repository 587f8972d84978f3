"""The synchronous gpuq client. Not thread-safe: one Client per thread."""

from __future__ import annotations

import collections
import mmap
import operator
import os
import time
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Literal, Mapping,
                    Optional, Sequence, SupportsFloat, SupportsInt, Tuple, Union)

import numpy as np
import numpy.typing as npt
import zmq

from gpuq import wire

if TYPE_CHECKING:
    from gpuq.region import Region, RegionChannel
    from gpuq.session import Session

# (The numpy types in quotes: numpy before 1.22 cannot subscript them at run time.)
# A grid or block size: n, (x, y) or (x, y, z).
Dim = Union[int, Sequence[int]]
# The shape of an output array.
Shape = Union[int, Tuple[int, ...]]
# A buffer sent to a kernel: a numpy array, or bytes-like.
Buffer = Union["npt.NDArray[Any]", bytes, bytearray, memoryview]
# A payload frame as sent.
Payload = Union[memoryview, bytes, bytearray]
# An output of a Result: a numpy array when its dtype is known (Out, an
# array passed as InOut), else bytes.
Output = Union["npt.NDArray[Any]", bytes]
# CURVE keys in Z85: (broker public key, our public key, our secret key).
CurveKeys = Tuple[Union[str, bytes], Union[str, bytes], Union[str, bytes]]
# How an output of a job is returned: (dtype, shape), by argument index.
OutSpec = Tuple["np.dtype[Any]", Optional[Shape]]  # how an output comes back
OutSpecs = Dict[int, OutSpec]
# A decoded header map.
Header = Dict[str, Any]
# An event of Client.poll().
Event = Union[Tuple[Literal["accepted"], int, int],
              Tuple[Literal["rejected"], Optional[int], "Error"],
              Tuple[Literal["result"], "Result"]]


# How often a waiting client asks again for a result that was not pushed.
REFETCH_S = 1.0


class Error(Exception):
    """A refusal or failure, with the protocol's error code (schema/PROTOCOL.md)."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0, job_id: int = 0) -> None:
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.job_id = job_id


class Scalar:
    """A scalar argument of a kernel; made by gpuq.u32(...), gpuq.f32(...), ..."""

    __slots__ = ("type", "value")

    def __init__(self, type_: str, value: Union[int, float]) -> None:
        self.type, self.value = type_, value

    def __repr__(self) -> str:
        return "gpuq.%s(%r)" % (self.type, self.value)


_Scalar = Scalar  # the name it had before


def _int_scalar(type_: str, bits: int, signed: bool) -> Callable[[SupportsInt], Scalar]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)

    def make(v: SupportsInt) -> Scalar:
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError("%d does not fit %s" % (n, type_))
        return Scalar(type_, n)
    make.__name__ = make.__qualname__ = type_
    make.__doc__ = "A %s argument; ValueError when the value does not fit." % type_
    return make


u8, i8 = _int_scalar("u8", 8, False), _int_scalar("i8", 8, True)
u16, i16 = _int_scalar("u16", 16, False), _int_scalar("i16", 16, True)
u32, i32 = _int_scalar("u32", 32, False), _int_scalar("i32", 32, True)
u64, i64 = _int_scalar("u64", 64, False), _int_scalar("i64", 64, True)


def f32(v: SupportsFloat) -> Scalar:
    """An f32 argument (sent as msgpack float 32)."""
    return Scalar("f32", float(v))


def f64(v: SupportsFloat) -> Scalar:
    """An f64 argument."""
    return Scalar("f64", float(v))


class In:
    """An input buffer: a numpy array or bytes, sent as it is."""

    def __init__(self, data: Buffer) -> None:
        self.data = data


class InOut(In):
    """A buffer sent to the kernel and returned after it, as the same array type."""


class Out:
    """An output buffer of `nbytes`, zero-filled on the GPU; returned as `dtype`, `shape`."""

    def __init__(self, nbytes: Optional[int] = None, dtype: npt.DTypeLike = np.uint8,
                 shape: Optional[Shape] = None) -> None:
        dt: np.dtype[Any] = np.dtype(dtype)
        if nbytes is None:
            if shape is None:
                raise ValueError("Out needs nbytes or shape")
            nbytes = int(np.prod(shape)) * dt.itemsize
        self.nbytes: int = int(nbytes)
        self.dtype: np.dtype[Any] = dt
        self.shape: Optional[Shape] = shape


class Scratch:
    """A buffer of a job of several launches: `nbytes`, zero-filled on the GPU,
    that never leaves it (room for what one launch leaves to the next)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes: int = int(nbytes)


class Buf:
    """An argument of a launch: a pointer `offset` bytes into the job's buffer
    `index` (its place in the job's `buffers`)."""

    def __init__(self, index: int, offset: int = 0) -> None:
        self.index: int = int(index)
        self.offset: int = int(offset)

    def __repr__(self) -> str:
        return "gpuq.Buf(%d, %d)" % (self.index, self.offset)


class Range:
    """A range of a registered region as an argument (or buffer of a job of
    several launches) of type `type` ("in", "out" or "inout"): bytes
    [offset, offset + size) of region `region`, copied to the GPU (in, inout)
    and back into the region (out, inout) in place; it never comes back in
    a Result (PROTOCOL.md, "Regions"). Made by gpuq.Region's in_(), out()
    and inout()."""

    __slots__ = ("type", "region", "offset", "size")

    def __init__(self, type_: Literal["in", "out", "inout"], region: int, offset: int,
                 size: int) -> None:
        if type_ not in wire.RANGE_TYPES:
            raise ValueError("a range is of type in, out or inout, not %r" % (type_,))
        self.type: str = type_
        self.region: int = int(region)
        self.offset: int = int(offset)
        self.size: int = int(size)

    def __repr__(self) -> str:
        return "gpuq.Range(%r, %d, %d, %d)" % (self.type, self.region, self.offset, self.size)


# An argument of a kernel.
Arg = Union[Scalar, In, Out, Range]
# A buffer of a job of several launches.
JobBuffer = Union[In, Out, Scratch, Range]
# An argument of a launch of a job of several launches.
LaunchArg = Union[Scalar, Buf]


class Launch:
    """One launch of a job of several launches: kernel `entry` of source
    `source` (0: the job's own source; i: sources[i - 1]), its dimensions and
    dynamic shared memory, and its arguments: scalars and gpuq.Buf(index) of
    the job's buffers."""

    def __init__(self, entry: str, grid: Dim, block: Dim, args: Sequence[LaunchArg], *,
                 shared: int = 0, source: int = 0, name_expression: bool = False) -> None:
        self.entry, self.grid, self.block, self.args = entry, grid, block, list(args)
        self.shared, self.source, self.name_expression = shared, source, name_expression


class Source:
    """Another source of a job of several launches, with its NVRTC options
    and named headers ({name: content})."""

    def __init__(self, source: str, options: Optional[Iterable[str]] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self.source = source
        self.options = list(options or [])
        self.headers = dict(headers or {})


class Result:
    """The end of a job: state, failure code and text, device, timing (µs), outputs.

    `timing` maps each phase to µs (PROTOCOL.md, "Timing"); for a job of
    several launches `timing["launches"]` lists each launch's time (not for
    one run as a CUDA graph, whose `kernel` is their span alone), and
    `outputs` are by buffer index."""

    def __init__(self, header: Mapping[str, Any], frames: Iterable[bytes],
                 out_specs: Optional[OutSpecs] = None) -> None:
        """`frames`: the payload frames; outputs named in `files` (local
        buffers, PROTOCOL.md) follow them and are mapped, not copied."""
        self.id: int = header.get("id", 0)
        self.state: str = header.get("state", "queued")
        self.code: str = header.get("code", "ok")
        self.error: str = header.get("error", "")
        self.device: str = header.get("device", "")
        self.attempts: int = header.get("attempts", 0)
        self.timing: Dict[str, Any] = header.get("timing", {})
        self.outputs: Dict[int, Output] = {}
        buffers: List[Union[bytes, mmap.mmap]] = list(frames)
        args, files = _check_outputs(header, len(buffers))
        for path, size in files:
            try:
                with open(path, "rb") as f:
                    found = os.fstat(f.fileno()).st_size
                    if found != size:
                        raise ValueError("it has %d bytes, the reply names %d" % (found, size))
                    buffers.append(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
                                   if size else b"")
            except (OSError, ValueError) as e:
                # As the C++ client: an output file that cannot be read (gone,
                # not of the size named) makes the result failed, not an exception.
                self.state, self.code = "failed", "io_error"
                self.error = "cannot read output file %s: %s" % (path, e)
                return
        for arg, frame in zip(args, buffers):
            spec = (out_specs or {}).get(arg)
            try:
                self.outputs[arg] = as_output(frame, spec)
            except ValueError as e:  # its size does not fit its dtype and shape
                assert spec is not None
                raise Error("malformed", "reply from the broker: output %d of %d bytes is not "
                            "of %s, shape %s" % (arg, len(frame), spec[0], spec[1])) from e

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def __repr__(self) -> str:
        return "Result(id=%d, state=%s, code=%s)" % (self.id, self.state, self.code)


def _check_outputs(header: Mapping[str, Any], frames: int
                   ) -> Tuple[List[int], List[Tuple[str, int]]]:
    """A reply's `outputs` and `files`, checked as the C++ client checks
    them (one output per payload frame and file, files as [full path,
    size]), and each argument index named once, which a dict of outputs
    needs; Error "malformed" or "invalid" when they are not."""
    def refuse(code: str, what: str) -> Error:
        return Error(code, "reply from the broker: " + what)

    def u64(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64

    args = header.get("outputs", [])
    files = header.get("files", [])
    if not isinstance(args, list) or not all(u64(a) and a < 1 << 32 for a in args):
        raise refuse("malformed", "outputs: expected a list of u32")
    if not isinstance(files, list) or not all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and u64(f[1])
            for f in files):
        raise refuse("malformed", "files: expected each file as [path, size]")
    for path, _ in files:
        if not path.startswith("/"):
            raise refuse("invalid", "files: %r is not a full path" % path[:128])
    if len(args) != frames + len(files):
        raise refuse("malformed", "one payload frame per output is required (%d outputs, "
                     "%d frames)" % (len(args), frames + len(files)))
    if len(set(args)) != len(args):
        raise refuse("malformed", "outputs: an argument is named more than once")
    return args, [(path, size) for path, size in files]


def default_endpoint() -> str:
    """$GPUQ_BROKER, else the local default ipc endpoint of gpuqd."""
    if os.environ.get("GPUQ_BROKER"):
        return os.environ["GPUQ_BROKER"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = runtime + "/gpuq" if runtime else "/tmp/gpuq-%d" % os.getuid()
    return "ipc://" + folder + "/broker.sock"


def open_socket(ctx: zmq.Context[Any], endpoint: Optional[str], curve: Optional[CurveKeys],
                tag: bytes, rcvhwm: int = 0) -> Any:
    """A DEALER to the broker with a random routing id (tag first: ZeroMQ
    reserves ids that start with a zero byte) and, when given
    (broker public key, our public key, our secret key) in Z85, CURVE."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, tag + os.urandom(15))
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)  # before connect: the pipe takes it then
    if curve:
        server, public, secret = (k.encode() if isinstance(k, str) else k for k in curve)
        sock.curve_serverkey = server
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(endpoint or default_endpoint())
    return sock


def _dim3(d: Dim) -> List[int]:
    t = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return [operator.index(x) for x in t] + [1] * (3 - len(t))


def build_submit(source: str, entry: Optional[str] = None, grid: Optional[Dim] = None,
                 block: Optional[Dim] = None, args: Optional[Sequence[Arg]] = None,
                 shared: int = 0, key: Optional[str] = None, tenant: Optional[str] = None,
                 priority: int = 5, deadline_ms: int = 0, limit_ms: int = 0,
                 options: Optional[Iterable[str]] = None,
                 headers: Optional[Mapping[str, str]] = None, name_expression: bool = False,
                 placement: Optional[Mapping[str, Any]] = None, local_dir: Optional[str] = None,
                 local_min: int = 1 << 20, launches: Optional[Sequence[Launch]] = None,
                 buffers: Optional[Sequence[JobBuffer]] = None,
                 sources: Optional[Sequence[Union[Source, str]]] = None, graph: bool = False
                 ) -> Tuple[Header, List[Payload], OutSpecs, List[str]]:
    """The job map, payload frames and output specs of a submit, and the local
    files it made. With `local_dir` (the broker's local directory, for a
    client on its host), inputs of `local_min` bytes or more are written to
    new files there and named in the job's `files` instead of being sent,
    and outputs that large are asked for as files.

    A job of one launch has `entry`, `grid`, `block` and `args`; a job of
    several launches (PROTOCOL.md, "Jobs of several launches") has
    `launches` and `buffers` instead, and may have `sources` and `graph`.
    Output specs are by argument index, or by buffer index."""
    made: List[str] = []
    try:
        return _build_submit(made, source, entry, grid, block, args, shared, key, tenant,
                             priority, deadline_ms, limit_ms, options, headers,
                             name_expression, placement, local_dir, local_min, launches,
                             buffers, sources, graph)
    except BaseException:
        _remove(made)  # files written before the argument that failed
        raise


def _build_submit(made: List[str], source: str, entry: Optional[str],
                  grid: Optional[Dim], block: Optional[Dim], args: Optional[Sequence[Arg]],
                  shared: int, key: Optional[str], tenant: Optional[str], priority: int,
                  deadline_ms: int, limit_ms: int, options: Optional[Iterable[str]],
                  headers: Optional[Mapping[str, str]], name_expression: bool,
                  placement: Optional[Mapping[str, Any]], local_dir: Optional[str],
                  local_min: int, launches: Optional[Sequence[Launch]],
                  buffers: Optional[Sequence[JobBuffer]],
                  sources: Optional[Sequence[Union[Source, str]]], graph: bool
                  ) -> Tuple[Header, List[Payload], OutSpecs, List[str]]:
    several = launches is not None
    if several:
        if (entry is not None or grid is not None or block is not None or args is not None or
                shared or name_expression):
            raise TypeError("a job of several launches names its entries, dimensions and "
                            "arguments in its launches")
        if not launches:
            raise ValueError("a job of several launches needs at least one launch")
        held: Sequence[Union[Arg, JobBuffer]] = list(buffers or [])
    else:
        if entry is None or grid is None or block is None or args is None:
            raise TypeError("a job needs entry, grid, block and args (or launches)")
        if buffers is not None or sources or graph:
            raise TypeError("buffers, sources and graph belong to jobs of several launches "
                            "(launches=[...])")
        held = args
    wire_args: List[List[Any]] = []
    payload: List[Payload] = []
    out_specs: OutSpecs = {}
    files: List[List[Any]] = []
    local_out = False
    for i, a in enumerate(held):
        if isinstance(a, Scalar) and not several:
            wire_args.append(scalar_arg(a, "argument %d" % i))
        elif isinstance(a, In):
            data, spec = in_bytes(a)
            if spec is not None:
                out_specs[i] = spec
            kind = "inout" if isinstance(a, InOut) else "in"
            if local_dir and len(data) >= local_min:
                name = "c-" + os.urandom(16).hex()
                path = os.path.join(local_dir, name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                made.append(path)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                # Payload indices of files follow the frames: numbered below.
                wire_args.append([kind, ("file", len(files))])
                files.append([name, len(data)])
                local_out = local_out or kind == "inout"
            else:
                wire_args.append([kind, len(payload)])
                payload.append(data)
        elif isinstance(a, Range):
            wire_args.append(wire.region_arg(a.type, a.region, a.offset, a.size))
        elif isinstance(a, Out):
            wire_args.append(["out", a.nbytes])
            out_specs[i] = (a.dtype, a.shape)
            local_out = local_out or (local_dir is not None and a.nbytes >= local_min)
        elif isinstance(a, Scratch) and several:
            wire_args.append(["scratch", a.nbytes])
        elif several:
            raise TypeError("buffer %d: use gpuq.In(...), gpuq.InOut(...), gpuq.Out(...), "
                            "gpuq.Scratch(...) or a region's range, not %r (scalars and gpuq.Buf "
                            "are arguments of a launch)" % (i, a))
        elif isinstance(a, (Scratch, Buf)):
            raise TypeError("argument %d: gpuq.Scratch and gpuq.Buf belong to jobs of several "
                            "launches (launches=[...])" % i)
        else:
            raise TypeError("argument %d: use gpuq.u32(...), gpuq.In(...), ... not %r" % (i, a))
    numbered = [[t, len(payload) + v[1] if isinstance(v, tuple) else v] for t, v in wire_args]
    job: Header = {}
    if key:
        job["key"] = key
    if tenant:
        job["tenant"] = tenant
    if priority != 5:
        job["priority"] = operator.index(priority)
    if deadline_ms:
        job["deadline_ms"] = int(deadline_ms)
    if limit_ms:
        job["limit_ms"] = int(limit_ms)
    job["src"] = source
    if not several:
        job["entry"] = entry
        if name_expression:
            job["expr"] = True
    _source_extras(job, options, headers)
    if not several:
        assert grid is not None and block is not None  # checked above
        job["grid"] = _dim3(grid)
        job["block"] = _dim3(block)
        if shared:
            job["shared"] = int(shared)
        job["args"] = numbered
    if placement:
        job["place"] = {k: placement[k] for k in ("arch", "gpu", "min_free") if k in placement}
    if files:
        job["files"] = files
    if local_out:
        job["local_out"] = True
    if several:
        assert launches is not None
        if sources:
            job["sources"] = [_source_map(i + 1, x) for i, x in enumerate(sources)]
        job["buffers"] = numbered
        job["launches"] = [_launch_map(i, x) for i, x in enumerate(launches)]
        if graph:
            job["graph"] = True
    return job, payload, out_specs, made


def _source_extras(m: Header, options: Optional[Iterable[str]],
                   headers: Optional[Mapping[str, str]]) -> None:
    if options:
        m["opts"] = list(options)
    if headers:
        m["headers"] = [[n, c] for n, c in headers.items()]


def _source_map(i: int, s: Union[Source, str]) -> Header:
    if isinstance(s, str):
        s = Source(s)
    if not isinstance(s, Source):
        raise TypeError("source %d: use gpuq.Source(...) or a str, not %r" % (i, s))
    m: Header = {"src": s.source}
    _source_extras(m, s.options, s.headers)
    return m


def _launch_map(i: int, launch: Launch) -> Header:
    if not isinstance(launch, Launch):
        raise TypeError("launch %d: use gpuq.Launch(...), not %r" % (i, launch))
    m: Header = {}
    if launch.source:
        m["source"] = int(launch.source)
    m["entry"] = launch.entry
    if launch.name_expression:
        m["expr"] = True
    m["grid"] = _dim3(launch.grid)
    m["block"] = _dim3(launch.block)
    if launch.shared:
        m["shared"] = int(launch.shared)
    m["args"] = launch_args(launch.args, "launch %d, " % i, "the job's buffers")
    return m


def launch_args(args: Sequence[Any], where: str, whose: str) -> List[List[Any]]:
    """The wire form of a launch's arguments: scalars, and gpuq.Buf of
    `whose` buffers (a job's by index, a session's by handle)."""
    out: List[List[Any]] = []
    for k, a in enumerate(args):
        if isinstance(a, Scalar):
            out.append(scalar_arg(a, "%sargument %d" % (where, k)))
        elif isinstance(a, Buf):
            out.append(["buf", a.index if a.offset == 0 else [a.index, a.offset]])
        else:
            raise TypeError("%sargument %d: a launch's arguments are scalars and gpuq.Buf of %s, "
                            "not %r" % (where, k, whose, a))
    return out


_INT_TYPES = ("u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64")


def scalar_arg(a: Scalar, what: str) -> List[Any]:
    """The wire form of scalar argument `what`: [type, value], a numpy
    scalar's value as the int (or, for f32 and f64, the float) it holds;
    TypeError naming it when its value is not a number of its type."""
    v = a.value
    if a.type in _INT_TYPES:
        if isinstance(v, np.integer):
            v = int(v)
        ok = isinstance(v, int)
    else:
        if isinstance(v, (np.integer, np.floating)):
            v = float(v)
        ok = isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise TypeError("%s: a %s value is %s, not %r of type %s"
                        % (what, a.type, "an int" if a.type in _INT_TYPES else "a number",
                           a.value, type(a.value).__name__))
    return [a.type, v]


def in_bytes(a: In) -> Tuple[Payload, Optional[OutSpec]]:
    """An In's bytes (an array's, contiguous, without a copy where it is),
    and for an InOut of an array how its output comes back: its dtype and
    shape (bytes in, bytes back: None)."""
    if not isinstance(a.data, np.ndarray):
        return a.data, None
    array = np.ascontiguousarray(a.data)
    return array.data.cast("B"), (array.dtype, array.shape) if isinstance(a, InOut) else None


def as_output(data: Any, spec: Optional[OutSpec]) -> Output:
    """An output's bytes as its spec says: an array of that dtype and shape,
    or bytes."""
    if spec is None:
        return bytes(data)
    dtype, shape = spec
    a = np.frombuffer(data, dtype=dtype)
    return a.reshape(shape) if shape is not None else a


def _nbytes(data: Buffer) -> int:
    return data.nbytes if isinstance(data, np.ndarray) else memoryview(data).nbytes


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def raise_for(header: Mapping[str, Any]) -> None:
    if header.get("op") == "error":
        raise Error(header.get("code", "internal"), header.get("error", ""),
                    header.get("retry_after_ms", 0), header.get("id", 0))



def _usage_request(tenant: Optional[str], since_ms: int, until_ms: int) -> Dict[str, Any]:
    """A usage request in canonical form (defaults left out)."""
    request: Dict[str, Any] = {"op": "usage"}
    if tenant:
        request["tenant"] = tenant
    if since_ms:
        request["since_ms"] = since_ms
    if until_ms:
        request["until_ms"] = until_ms
    return request

class Client:
    """A connection to a gpuq broker.

    Many jobs may be in flight: submit() returns once the job is stored, and
    results are pushed by the broker; wait() collects them.
    """

    def __init__(self, endpoint: Optional[str] = None, timeout: float = 10.0,
                 context: Optional[zmq.Context[Any]] = None,
                 curve: Optional[CurveKeys] = None, local_buffers: bool = True,
                 local_min: int = 1 << 20) -> None:
        """local_buffers: on an ipc endpoint, pass buffers of `local_min` bytes
        or more as files of the broker's local directory (PROTOCOL.md)."""
        self._ctx: zmq.Context[Any] = context or zmq.Context.instance()
        self._sock = open_socket(self._ctx, endpoint, curve, b"p")
        self._endpoint = endpoint or default_endpoint()
        self._curve = curve
        self._ipc = self._endpoint.startswith("ipc://")
        self._local = local_buffers and self._ipc
        self._local_min = local_min
        self._local_dir: Optional[str] = None             # asked of the broker once
        self._pending_files: Dict[int, List[str]] = {}    # submit rid -> files made for it
        self._pending_specs: Dict[int, OutSpecs] = {}     # submit rid -> output specs
        self.timeout = timeout
        self._rid = 0
        # (header, frames) not yet claimed
        self._events: Deque[Tuple[Header, List[bytes]]] = collections.deque()
        self._out_specs: Dict[int, OutSpecs] = {}         # job id -> output specs
        self._regions: Optional[RegionChannel] = None     # opened by the first region()

    def close(self) -> None:
        """Closes the connection. Regions registered on this client live on
        until they are closed too (their channel closes with the last)."""
        self._sock.close(0)
        channel, self._regions = self._regions, None
        if channel is not None:
            channel.release()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _send(self, header: Header, payload: Iterable[Any] = ()) -> None:
        self._sock.send_multipart([wire.CLIENT_PROTOCOL, wire.encode(header)] + list(payload),
                                  copy=False)

    def _recv(self, deadline: float) -> Tuple[Header, List[bytes]]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise Error("timeout", "no answer from the broker in time")
            frames: List[bytes] = self._sock.recv_multipart(copy=True)
            if len(frames) >= 2 and frames[0] == wire.CLIENT_PROTOCOL:
                try:
                    h = wire.decode(frames[1])
                except Exception:  # not a reply this client can read: dropped
                    continue
                if isinstance(h, dict):
                    return h, frames[2:]

    def _call(self, header: Header, payload: Iterable[Any] = (),
              timeout: Optional[float] = None) -> Tuple[Header, List[bytes]]:
        return self._reply(self._request(header, payload), timeout)

    def _request(self, header: Header, payload: Iterable[Any] = ()) -> int:
        """Sends a request with the next rid: that rid. Nothing is sent when
        its header cannot be encoded."""
        self._rid += 1
        self._send(dict(op=header.pop("op"), rid=self._rid, **header), payload)
        return self._rid

    def _reply(self, rid: int, timeout: Optional[float] = None) -> Tuple[Header, List[bytes]]:
        """The reply to request `rid` (an Error for an error reply)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            h, frames = self._recv(deadline)
            if h.get("rid") == rid:
                raise_for(h)
                return h, frames
            self._keep(h, frames)

    # Pushed results nobody has taken are bounded: past either bound the
    # oldest go, as the broker drops the pushes of a client that does not
    # read (fetch() and wait() still get them).
    MAX_KEPT_RESULTS = 1024
    MAX_KEPT_RESULT_BYTES = 256 << 20

    def _keep(self, h: Header, frames: List[bytes]) -> None:
        """Files a message that is not the awaited one for poll():
        acknowledgements, rejections and pushed results; anything else
        answers a request that timed out, and is dropped."""
        op = h.get("op")
        if op not in ("accepted", "error") and not (op == "result" and h.get("rid") == 0):
            return
        self._events.append((h, frames))
        results = [e for e in self._events if e[0].get("op") == "result"]
        count = len(results)
        size = sum(len(f) for e in results for f in e[1])
        if count <= self.MAX_KEPT_RESULTS and size <= self.MAX_KEPT_RESULT_BYTES:
            return
        kept: Deque[Tuple[Header, List[bytes]]] = collections.deque()
        for e in self._events:
            if e[0].get("op") == "result" and (count > self.MAX_KEPT_RESULTS
                                                or size > self.MAX_KEPT_RESULT_BYTES):
                count -= 1
                size -= sum(len(f) for f in e[1])
                continue
            kept.append(e)
        self._events = kept

    # -------------------------------------------------------------- calls

    def _local_directory(self) -> str:
        """The broker's local directory ("" when it has none), asked once."""
        if self._local_dir is None:
            h, _ = self._call({"op": "devices"})
            self._local_dir = h.get("local_dir", "")
        return self._local_dir

    def _region_channel(self) -> RegionChannel:
        """The region channel, opened on the first region() (and again after
        it closed)."""
        from gpuq.region import RegionChannel
        if self._regions is not None and not self._regions.closed:
            return self._regions
        if not self._ipc:
            raise Error("invalid", "regions need the broker's ipc endpoint")
        local_dir = self._local_directory()
        if not local_dir:
            raise Error("unavailable", "the broker has no local directory for regions")
        if self._regions is not None:
            self._regions.release()
        self._regions = RegionChannel(local_dir, self.timeout)
        return self._regions

    def _build(self, source: str, kw: Dict[str, Any]
               ) -> Tuple[Header, List[Payload], OutSpecs, List[str]]:
        local_dir = None
        if self._local:
            held = list(kw.get("args") or []) + list(kw.get("buffers") or [])
            large = any((isinstance(a, In) and _nbytes(a.data) >= self._local_min) or
                        (isinstance(a, Out) and a.nbytes >= self._local_min) for a in held)
            if large:
                self._local_directory()
            local_dir = self._local_dir or None
        return build_submit(source, local_dir=local_dir, local_min=self._local_min, **kw)

    def submit(self, source: str, entry: Optional[str] = None, grid: Optional[Dim] = None,
               block: Optional[Dim] = None, args: Optional[Sequence[Arg]] = None, *,
               shared: int = 0, key: Optional[str] = None, tenant: Optional[str] = None,
               priority: int = 5, deadline_ms: int = 0, limit_ms: int = 0,
               options: Optional[Iterable[str]] = None,
               headers: Optional[Mapping[str, str]] = None, name_expression: bool = False,
               placement: Optional[Mapping[str, Any]] = None,
               launches: Optional[Sequence[Launch]] = None,
               buffers: Optional[Sequence[JobBuffer]] = None,
               sources: Optional[Sequence[Union[Source, str]]] = None,
               graph: bool = False) -> int:
        """Submits a job; returns its id once the broker has stored it.

        Keywords: shared, key (idempotency), tenant, priority (0-9), deadline_ms,
        limit_ms, options, headers ({name: content}), name_expression,
        placement ({"arch", "gpu", "min_free"}).

        A job of several launches (PROTOCOL.md, "Jobs of several launches")
        gives `launches` (gpuq.Launch) and `buffers` (gpuq.In, InOut, Out,
        Scratch) instead of entry, grid, block and args: the launches run in
        order on one stream, each naming the job's buffers with gpuq.Buf(i).
        `sources` (gpuq.Source or str) are sources 1, 2, ... for
        Launch(source=i); `graph` asks the worker to replay a CUDA graph of
        the launches for later jobs of the same shape (the result then has
        no per-launch times). Its outputs are by buffer index.
        """
        kw = dict(entry=entry, grid=grid, block=block, args=args, shared=shared, key=key,
                  tenant=tenant, priority=priority, deadline_ms=deadline_ms, limit_ms=limit_ms,
                  options=options, headers=headers, name_expression=name_expression,
                  placement=placement, launches=launches, buffers=buffers, sources=sources,
                  graph=graph)
        job, payload, specs, made = self._build(source, kw)
        try:
            rid = self._request({"op": "submit", "job": job}, payload)
        except BaseException:
            _remove(made)  # not sent (a value the encoder refuses): the files are ours
            raise
        try:
            h, _ = self._reply(rid)
        except Error as e:
            # A refused submit's files are not the broker's; after a timeout
            # the broker may yet take the job, and them (as the C++ client).
            if e.code != "timeout":
                _remove(made)
            raise
        job_id: int = h["id"]
        self._out_specs[job_id] = specs
        return job_id

    def region(self, size: int, tenant: Optional[str] = None) -> Region:
        """Registers `size` bytes of new memory of this process as a region of
        `tenant` (None: the broker's "default"; PROTOCOL.md, "Regions"), for
        jobs that name its ranges (region.in_(), out(), inout()) to read and
        write in place. Needs the broker's ipc endpoint, on its host.
        Error with the broker's code when it refuses (e.g.
        `resource_exhausted` past the tenant's bounds)."""
        from gpuq.region import Region
        return Region(self._region_channel(), size, tenant)

    def session(self, tenant: Optional[str] = None, memory: int = 0, idle_ms: int = 0,
                placement: Optional[Mapping[str, Any]] = None, limit_ms: int = 0,
                through_broker: bool = False) -> Session:
        """Opens a session on a GPU of the broker's host (PROTOCOL.md,
        "Sessions"): device buffers that stay between launches, in a process
        of the tenant's own. `memory`: the device bytes it may hold, `idle_ms`:
        it ends after this long unused (0: the broker's defaults); `placement`
        as a job's (arch, gpu, min_free); `limit_ms`: each launch's run-time
        limit (0: the broker's default, a job's; a launch past it ends the
        tenant's sessions on that GPU, "session_lost"). `tenant` counts off
        CURVE only. A client whose endpoint is not ipc:// (or that asks with
        `through_broker`) sends every request through the broker (PROTOCOL.md,
        "Sessions through the broker"): a hop each way, no attached regions.
        Error "resource_exhausted" past the tenant's session limits,
        "unavailable" when no GPU of the broker's host matches."""
        from gpuq.session import Session
        spec: Dict[str, Any] = {}
        for k, v in (placement or {}).items():
            if k not in ("arch", "gpu", "min_free"):
                raise TypeError("placement takes arch, gpu and min_free, not %r" % k)
            spec[k] = v
        if idle_ms:
            spec["idle_ms"] = int(idle_ms)
        if memory:
            spec["memory"] = int(memory)
        if limit_ms:
            spec["limit_ms"] = int(limit_ms)
        header: Header = {"op": "session_open"}
        if tenant:
            header["tenant"] = tenant
        header["session"] = spec
        reply, _ = self._call(header)
        if through_broker or not self._ipc:
            # A connection of the session's own: the session lives as long
            # as it does.
            # Answers of many calls in flight are taken in as they come, not
            # left in the broker (which ends a session whose client does not
            # take them).
            relay = open_socket(self._ctx, self._endpoint, self._curve, b"s", rcvhwm=1000000)
            return Session(reply, self.timeout, relay)
        try:
            return Session(reply, self.timeout)
        except Error:
            # A session this client cannot reach is closed, not left to
            # count against the tenant's bounds until its idle timeout.
            try:
                self.close_session(reply["id"])
            except Error:
                pass
            raise

    def close_session(self, session_id: int) -> None:
        """Ends session `session_id` through the broker (any client of its
        tenant may)."""
        self._call({"op": "session_close", "id": int(session_id)})

    def submit_async(self, source: str, entry: Optional[str] = None,
                     grid: Optional[Dim] = None, block: Optional[Dim] = None,
                     args: Optional[Sequence[Arg]] = None, *, shared: int = 0,
                     key: Optional[str] = None, tenant: Optional[str] = None,
                     priority: int = 5, deadline_ms: int = 0, limit_ms: int = 0,
                     options: Optional[Iterable[str]] = None,
                     headers: Optional[Mapping[str, str]] = None,
                     name_expression: bool = False,
                     placement: Optional[Mapping[str, Any]] = None,
                     launches: Optional[Sequence[Launch]] = None,
                     buffers: Optional[Sequence[JobBuffer]] = None,
                     sources: Optional[Sequence[Union[Source, str]]] = None,
                     graph: bool = False) -> int:
        """Sends a submit without waiting; returns the request id (see poll()).
        Arguments as for submit()."""
        kw = dict(entry=entry, grid=grid, block=block, args=args, shared=shared, key=key,
                  tenant=tenant, priority=priority, deadline_ms=deadline_ms, limit_ms=limit_ms,
                  options=options, headers=headers, name_expression=name_expression,
                  placement=placement, launches=launches, buffers=buffers, sources=sources,
                  graph=graph)
        job, payload, specs, made = self._build(source, kw)
        try:
            rid = self._request({"op": "submit", "job": job}, payload)
        except BaseException:
            _remove(made)  # not sent: the files are ours
            raise
        if made:
            self._pending_files[rid] = made
        self._pending_specs[rid] = specs
        return rid

    def poll(self, timeout: Optional[float] = None) -> Event:
        """The next event: ("accepted", rid, id), ("rejected", rid, Error) or ("result", Result)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self._events:
                h, frames = self._events.popleft()
            else:
                h, frames = self._recv(deadline)
            op = h.get("op")
            if op == "accepted":
                self._pending_files.pop(h["rid"], None)
                specs = self._pending_specs.pop(h["rid"], None)
                if specs is not None:
                    self._out_specs[h["id"]] = specs
                return ("accepted", h["rid"], h["id"])
            if op == "error":
                _remove(self._pending_files.pop(h.get("rid", 0), []))
                self._pending_specs.pop(h.get("rid", 0), None)
                return ("rejected", h.get("rid"), Error(h["code"], h["error"],
                                                        h.get("retry_after_ms", 0)))
            if op == "result" and h.get("rid") == 0:
                return ("result", Result(h, frames, self._out_specs.pop(h["id"], None)))

    def wait(self, job_id: int, timeout: Optional[float] = None) -> Result:
        """The Result of a job, waiting for it to end.

        A result is pushed only to the connection that submitted the job, in
        the broker's lifetime: after a reconnect, a broker restart or a push
        dropped because this client did not read, only a fetch finds it. So
        the result is fetched first, and again every second while waiting.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, (h, frames) in enumerate(self._events):
                if h.get("op") == "result" and h.get("rid") == 0 and h.get("id") == job_id:
                    del self._events[i]
                    return Result(h, frames, self._out_specs.pop(job_id, None))
            fetched = self.result(job_id)
            if fetched.state in wire.TERMINAL:
                # Its push, if it came meanwhile, is the same result: not
                # kept twice.
                self._events = collections.deque(
                    e for e in self._events
                    if not (e[0].get("op") == "result" and e[0].get("id") == job_id))
                return fetched
            refetch = min(deadline, time.monotonic() + REFETCH_S)
            while True:
                try:
                    h, frames = self._recv(refetch)
                except Error as e:
                    if e.code == "timeout" and time.monotonic() < deadline:
                        break  # fetch again
                    raise
                if h.get("op") == "result" and h.get("rid") == 0 and h.get("id") == job_id:
                    return Result(h, frames, self._out_specs.pop(job_id, None))
                self._keep(h, frames)

    def status(self, job_id: int) -> Result:
        """The job's state (no outputs)."""
        h, frames = self._call({"op": "status", "id": job_id})
        return Result(h, frames)

    def result(self, job_id: int) -> Result:
        """The ended job's Result (its state only, while it has not ended)."""
        h, frames = self._call({"op": "result", "id": job_id})
        if h.get("op") == "result":
            return Result(h, frames, self._out_specs.pop(job_id, None))
        return Result(h, frames)

    def cancel(self, job_id: int) -> str:
        """Cancels a job; returns its state after the cancel."""
        h, _ = self._call({"op": "cancel", "id": job_id})
        state: str = h["state"]
        return state

    def stats(self) -> Dict[str, Any]:
        """The broker's counters (PROTOCOL.md, "stats")."""
        h, _ = self._call({"op": "stats"})
        stats: Dict[str, Any] = h["stats"]
        return stats

    def devices(self) -> List[Dict[str, Any]]:
        """The registered workers and their GPUs (PROTOCOL.md, "devices")."""
        h, _ = self._call({"op": "devices"})
        workers: List[Dict[str, Any]] = h["workers"]
        return workers

    def usage(self, tenant: Optional[str] = None, since_ms: int = 0,
              until_ms: int = 0) -> List[Dict[str, Any]]:
        """What tenants used (PROTOCOL.md, "usage"): one dict per tenant, by
        name, of the jobs that ended in [since_ms, until_ms) (Unix ms, to the
        hour; until 0: now): done, failed, canceled, expired, gpu_us,
        kernel_us, bytes_in, bytes_out."""
        h, _ = self._call(_usage_request(tenant, since_ms, until_ms))
        usage: List[Dict[str, Any]] = h["usage"]
        return usage
