"""The synchronous gpuq client. Not thread-safe: one Client per thread."""

import collections
import mmap
import os
import time

import numpy as np
import zmq

from gpuq import wire


# How often a waiting client asks again for a result that was not pushed.
REFETCH_S = 1.0


class Error(Exception):
    """A refusal or failure, with the protocol's error code (schema/PROTOCOL.md)."""

    def __init__(self, code, message, retry_after_ms=0, job_id=0):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.job_id = job_id


class _Scalar:
    __slots__ = ("type", "value")

    def __init__(self, type_, value):
        self.type, self.value = type_, value


def _int_scalar(type_, bits, signed):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)

    def make(v):
        v = int(v)
        if not lo <= v <= hi:
            raise ValueError("%d does not fit %s" % (v, type_))
        return _Scalar(type_, v)
    return make


u8, i8 = _int_scalar("u8", 8, False), _int_scalar("i8", 8, True)
u16, i16 = _int_scalar("u16", 16, False), _int_scalar("i16", 16, True)
u32, i32 = _int_scalar("u32", 32, False), _int_scalar("i32", 32, True)
u64, i64 = _int_scalar("u64", 64, False), _int_scalar("i64", 64, True)


def f32(v):
    return _Scalar("f32", float(v))


def f64(v):
    return _Scalar("f64", float(v))


class In:
    """An input buffer: a numpy array or bytes, sent as it is."""

    def __init__(self, data):
        self.data = data


class InOut(In):
    """A buffer sent to the kernel and returned after it, as the same array type."""


class Out:
    """An output buffer of `nbytes`, zero-filled on the GPU; returned as `dtype`, `shape`."""

    def __init__(self, nbytes=None, dtype=np.uint8, shape=None):
        dtype = np.dtype(dtype)
        if nbytes is None:
            if shape is None:
                raise ValueError("Out needs nbytes or shape")
            nbytes = int(np.prod(shape)) * dtype.itemsize
        self.nbytes, self.dtype, self.shape = int(nbytes), dtype, shape


class Result:
    """The end of a job: state, failure code and text, device, timing (µs), outputs."""

    def __init__(self, header, frames, out_specs=None):
        """`frames`: the payload frames; outputs named in `files` (local
        buffers, PROTOCOL.md) follow them and are mapped, not copied."""
        self.id = header.get("id", 0)
        self.state = header.get("state", "queued")
        self.code = header.get("code", "ok")
        self.error = header.get("error", "")
        self.device = header.get("device", "")
        self.attempts = header.get("attempts", 0)
        self.timing = header.get("timing", {})
        self.outputs = {}
        buffers = list(frames)
        for path, size in header.get("files", []):
            if size == 0:
                buffers.append(b"")
                continue
            with open(path, "rb") as f:
                buffers.append(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
        for arg, frame in zip(header.get("outputs", []), buffers):
            spec = (out_specs or {}).get(arg)
            if spec is None:
                self.outputs[arg] = bytes(frame)
            else:
                dtype, shape = spec
                a = np.frombuffer(frame, dtype=dtype)
                self.outputs[arg] = a.reshape(shape) if shape is not None else a

    @property
    def ok(self):
        return self.state == "done"

    def __repr__(self):
        return "Result(id=%d, state=%s, code=%s)" % (self.id, self.state, self.code)


def default_endpoint():
    """$GPUQ_BROKER, else the local default ipc endpoint of gpuqd."""
    if os.environ.get("GPUQ_BROKER"):
        return os.environ["GPUQ_BROKER"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = runtime + "/gpuq" if runtime else "/tmp/gpuq-%d" % os.getuid()
    return "ipc://" + folder + "/broker.sock"


def open_socket(ctx, endpoint, curve, tag):
    """A DEALER to the broker with a random routing id (tag first: ZeroMQ
    reserves ids that start with a zero byte) and, when given
    (broker public key, our public key, our secret key) in Z85, CURVE."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, tag + os.urandom(15))
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        server, public, secret = (k.encode() if isinstance(k, str) else k for k in curve)
        sock.curve_serverkey = server
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(endpoint or default_endpoint())
    return sock


def _dim3(d):
    d = (d,) if isinstance(d, int) else tuple(d)
    return list(d) + [1] * (3 - len(d))


def build_submit(source, entry, grid, block, args, shared=0, key=None, tenant=None,
                 priority=5, deadline_ms=0, limit_ms=0, options=None, headers=None,
                 name_expression=False, placement=None, local_dir=None, local_min=1 << 20):
    """The job map, payload frames and output specs of a submit, and the local
    files it made. With `local_dir` (the broker's local directory, for a
    client on its host), inputs of `local_min` bytes or more are written to
    new files there and named in the job's `files` instead of being sent,
    and outputs that large are asked for as files."""
    wire_args, payload, out_specs = [], [], {}
    files, made, local_out = [], [], False
    for i, a in enumerate(args):
        if isinstance(a, _Scalar):
            wire_args.append([a.type, a.value])
        elif isinstance(a, In):
            data = a.data
            if isinstance(data, np.ndarray):
                data = np.ascontiguousarray(data)
                if isinstance(a, InOut):
                    out_specs[i] = (data.dtype, data.shape)
                data = memoryview(data).cast("B")
            # bytes in, bytes back: no spec, the output stays bytes
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
        elif isinstance(a, Out):
            wire_args.append(["out", a.nbytes])
            out_specs[i] = (a.dtype, a.shape)
            local_out = local_out or (local_dir is not None and a.nbytes >= local_min)
        else:
            raise TypeError("argument %d: use gpuq.u32(...), gpuq.In(...), ... not %r" % (i, a))
    job = {}
    if key:
        job["key"] = key
    if tenant:
        job["tenant"] = tenant
    if priority != 5:
        job["priority"] = priority
    if deadline_ms:
        job["deadline_ms"] = int(deadline_ms)
    if limit_ms:
        job["limit_ms"] = int(limit_ms)
    job["src"] = source
    job["entry"] = entry
    if name_expression:
        job["expr"] = True
    if options:
        job["opts"] = list(options)
    if headers:
        job["headers"] = [[n, c] for n, c in headers.items()]
    job["grid"] = _dim3(grid)
    job["block"] = _dim3(block)
    if shared:
        job["shared"] = int(shared)
    job["args"] = [[t, len(payload) + v[1] if isinstance(v, tuple) else v] for t, v in wire_args]
    if placement:
        job["place"] = {k: placement[k] for k in ("arch", "gpu", "min_free") if k in placement}
    if files:
        job["files"] = files
    if local_out:
        job["local_out"] = True
    return job, payload, out_specs, made


def _remove(paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def raise_for(header):
    if header.get("op") == "error":
        raise Error(header.get("code", "internal"), header.get("error", ""),
                    header.get("retry_after_ms", 0), header.get("id", 0))


class Client:
    """A connection to a gpuq broker.

    Many jobs may be in flight: submit() returns once the job is stored, and
    results are pushed by the broker; wait() collects them.
    """

    def __init__(self, endpoint=None, timeout=10.0, context=None, curve=None,
                 local_buffers=True, local_min=1 << 20):
        """local_buffers: on an ipc endpoint, pass buffers of `local_min` bytes
        or more as files of the broker's local directory (PROTOCOL.md)."""
        self._ctx = context or zmq.Context.instance()
        self._sock = open_socket(self._ctx, endpoint, curve, b"p")
        self._local = local_buffers and (endpoint or default_endpoint()).startswith("ipc://")
        self._local_min = local_min
        self._local_dir = None                # asked of the broker once
        self._pending_files = {}              # submit rid -> files made for it
        self.timeout = timeout
        self._rid = 0
        self._events = collections.deque()   # (kind, header, frames) not yet claimed
        self._out_specs = {}                  # job id -> output specs

    def close(self):
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- plumbing

    def _send(self, header, payload=()):
        self._sock.send_multipart([wire.CLIENT_PROTOCOL, wire.encode(header)] + list(payload),
                                  copy=False)

    def _recv(self, deadline):
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise Error("timeout", "no answer from the broker in time")
            frames = self._sock.recv_multipart(copy=True)
            if len(frames) >= 2 and frames[0] == wire.CLIENT_PROTOCOL:
                return wire.decode(frames[1]), frames[2:]

    def _call(self, header, payload=(), timeout=None):
        self._rid += 1
        header = dict(op=header.pop("op"), rid=self._rid, **header)
        self._send(header, payload)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            h, frames = self._recv(deadline)
            if h.get("rid") == header["rid"]:
                raise_for(h)
                return h, frames
            self._events.append((h, frames))

    # -------------------------------------------------------------- calls

    def _build(self, source, entry, grid, block, args, kw):
        local_dir = None
        if self._local:
            large = any((isinstance(a, In) and memoryview(a.data).nbytes >= self._local_min) or
                        (isinstance(a, Out) and a.nbytes >= self._local_min) for a in args)
            if large and self._local_dir is None:
                h, _ = self._call({"op": "devices"})
                self._local_dir = h.get("local_dir", "")
            local_dir = self._local_dir or None
        return build_submit(source, entry, grid, block, args, local_dir=local_dir,
                            local_min=self._local_min, **kw)

    def submit(self, source, entry, grid, block, args, **kw):
        """Submits a job; returns its id once the broker has stored it.

        Keywords: shared, key (idempotency), tenant, priority (0-9), deadline_ms,
        limit_ms, options, headers ({name: content}), name_expression,
        placement ({"arch", "gpu", "min_free"}).
        """
        job, payload, specs, made = self._build(source, entry, grid, block, args, kw)
        try:
            h, _ = self._call({"op": "submit", "job": job}, payload)
        except Error:
            _remove(made)  # a refused submit's files are not the broker's
            raise
        self._out_specs[h["id"]] = specs
        return h["id"]

    def submit_async(self, source, entry, grid, block, args, **kw):
        """Sends a submit without waiting; returns the request id (see poll())."""
        job, payload, specs, made = self._build(source, entry, grid, block, args, kw)
        self._rid += 1
        if made:
            self._pending_files[self._rid] = made
        self._send({"op": "submit", "rid": self._rid, "job": job}, payload)
        self._pending_specs = getattr(self, "_pending_specs", {})
        self._pending_specs[self._rid] = specs
        return self._rid

    def poll(self, timeout=None):
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
                specs = getattr(self, "_pending_specs", {}).pop(h["rid"], None)
                if specs is not None:
                    self._out_specs[h["id"]] = specs
                return ("accepted", h["rid"], h["id"])
            if op == "error":
                _remove(self._pending_files.pop(h.get("rid"), []))
                getattr(self, "_pending_specs", {}).pop(h.get("rid"), None)
                return ("rejected", h.get("rid"), Error(h["code"], h["error"],
                                                        h.get("retry_after_ms", 0)))
            if op == "result" and h.get("rid") == 0:
                return ("result", Result(h, frames, self._out_specs.pop(h["id"], None)))

    def wait(self, job_id, timeout=None):
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
                self._events.append((h, frames))

    def status(self, job_id):
        h, frames = self._call({"op": "status", "id": job_id})
        return Result(h, frames)

    def result(self, job_id):
        """The ended job's Result (its state only, while it has not ended)."""
        h, frames = self._call({"op": "result", "id": job_id})
        if h.get("op") == "result":
            return Result(h, frames, self._out_specs.pop(job_id, None))
        return Result(h, frames)

    def cancel(self, job_id):
        h, _ = self._call({"op": "cancel", "id": job_id})
        return h["state"]

    def stats(self):
        h, _ = self._call({"op": "stats"})
        return h["stats"]

    def devices(self):
        h, _ = self._call({"op": "devices"})
        return h["workers"]
