"""Registered regions (PROTOCOL.md, "Regions"): memory of this process shared
once with the broker's workers on its host, as a sealed memfd handed over on
the broker's region channel, and named by jobs as ranges read and written in
place. Made by gpuq.Client.region()."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import time
from typing import Any, Dict, Literal, Optional, Set

import numpy as np
import numpy.typing as npt

from gpuq import wire
from gpuq.client import Error, Range, Shape

# The region socket in the broker's local directory.
SOCKET_NAME = "regions.sock"


class RegionChannel:
    """A connection to the broker's region socket, opened with its hello.

    Shared by a Client and the regions registered on it: it closes when the
    last of them lets it go (closing it ends every region it registered)."""

    def __init__(self, local_dir: str, timeout: float) -> None:
        self.timeout = timeout
        self._rid = 0
        self._abandoned: Set[int] = set()  # registers that timed out
        self._users = 1
        path = os.path.join(local_dir, SOCKET_NAME)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            self._sock: Optional[socket.socket] = sock
            self._send({"op": "hello", "protocol": wire.REGION_PROTOCOL})
        except OSError as e:
            sock.close()
            raise Error("unavailable", "the broker's region channel %s: %s" % (path, e)) from e

    @property
    def closed(self) -> bool:
        return self._sock is None

    def retain(self) -> None:
        self._users += 1

    def release(self) -> None:
        """Lets the channel go; the last user closes it."""
        self._users -= 1
        if self._users <= 0:
            self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: Dict[str, Any], fd: Optional[int] = None) -> None:
        assert self._sock is not None
        data = wire.encode_region(message)
        if fd is None:
            self._sock.send(data, socket.MSG_NOSIGNAL)
        else:
            socket.send_fds(self._sock, [data], [fd], socket.MSG_NOSIGNAL)

    def _receive(self) -> Optional[Dict[str, Any]]:
        """One message that has come (None when none has)."""
        assert self._sock is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, wire.REGION_MESSAGE_MAX + 1, 4,
                                              socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            self._close()
            raise Error("unavailable", "the region channel: %s" % e) from e
        for stray in fds:  # a client is never handed a descriptor
            os.close(stray)
        if not data:
            self._close()
            raise Error("unavailable", "the broker closed the region channel")
        try:
            return wire.decode_region(data)
        except ValueError as e:
            raise Error("malformed", "region channel: %s" % e) from e

    def _late(self, reply: Dict[str, Any]) -> None:
        """A reply to a call that stopped waiting: a region registered after
        its register timed out has no owner here, and is unregistered (it
        counted against the tenant's bounds until the channel closed)."""
        rid = reply.get("rid")
        if rid in self._abandoned:
            self._abandoned.discard(rid)
            if reply["op"] == "registered":
                self._rid += 1
                try:
                    self._send({"op": "unregister", "rid": self._rid,
                                "region": reply["region"]})
                except OSError as e:
                    self._close()
                    raise Error("unavailable", "the region channel: %s" % e) from e

    def call(self, message: Dict[str, Any], fd: Optional[int] = None) -> Dict[str, Any]:
        """Sends a request (with descriptor `fd`) and returns its reply;
        Error with the reply's code when it is `error`."""
        if self._sock is None:
            raise Error("unavailable", "the region channel is closed")
        # Replies that came after their calls stopped waiting, first: a region
        # registered too late goes before this request counts it.
        while self._abandoned:
            late = self._receive()
            if late is None:
                break
            self._late(late)
            if self._sock is None:
                raise Error("unavailable", "the region channel is closed")
        self._rid += 1
        rid = self._rid
        request = dict(message, rid=rid)  # written in canonical order
        try:
            self._send(request, fd)
        except OSError as e:
            self._close()
            raise Error("unavailable", "the region channel: %s" % e) from e
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                if message.get("op") == "register" and len(self._abandoned) < 1024:
                    self._abandoned.add(rid)
                raise Error("timeout", "no answer on the region channel")
            reply = self._receive()
            if reply is None:
                continue
            # An error without a rid answers a request the broker could not
            # read: this one (one is outstanding at a time). Another rid
            # answers an earlier request that timed out.
            if reply.get("rid") != rid and not (reply.get("rid") == 0
                                                and reply["op"] == "error"):
                self._late(reply)
                if self._sock is None:
                    raise Error("unavailable", "the region channel is closed")
                continue
            if reply["op"] == "error":
                raise Error(reply["code"], reply["error"])
            return reply


def sealed_memfd(size: int, name: str = "gpuq-region") -> int:
    """A memfd of `size` bytes sealed against shrinking, growing and further
    seals, as the region channel takes it."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Region:
    """A registered region: `size` bytes of this process's memory, shared with
    the broker's workers on this host, that jobs name as ranges (in_(), out(),
    inout()): their in and inout ranges are copied from it to the GPU, their
    out and inout ranges copied back into it after the kernel, and nothing
    else moves. Write inputs before submitting, read outputs after the
    result; two unfinished jobs may not write overlapping bytes.

    `buffer` is the memory as a writable memoryview, array() as a numpy
    array. unregister() ends the region (queued jobs that name it fail with
    `unavailable`, running ones finish first); close() (or leaving a `with`
    block) ends it and unmaps the memory, which stays mapped while arrays
    or views of it live. A region also ends when the channel of the Client
    that registered it closes (its process exits, or the Client and all its
    regions are closed). Not thread-safe, like its Client; may outlive it."""

    def __init__(self, channel: RegionChannel, size: int, tenant: Optional[str] = None) -> None:
        """Registers `size` bytes on `channel` for `tenant` (None: the
        broker's "default"); use gpuq.Client.region()."""
        size = int(size)
        if size < 1:
            raise ValueError("a region has at least 1 byte, not %d" % size)
        fd = sealed_memfd(size)
        try:
            self._mm: Optional[mmap.mmap] = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                                      mmap.PROT_READ | mmap.PROT_WRITE)
            request: Dict[str, Any] = {"op": "register", "size": size}
            if tenant:
                request["tenant"] = tenant
            try:
                reply = channel.call(request, fd)
            except BaseException:
                self._mm.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        # Kept for a session to attach (Session.attach); closed with the region.
        self._fd: Optional[int] = fd
        self.id: int = reply["region"]
        self.size: int = size
        self.tenant: str = tenant or "default"
        self._view: Optional[memoryview] = memoryview(self._mm)
        self._channel: Optional[RegionChannel] = channel
        channel.retain()

    @property
    def registered(self) -> bool:
        """Whether the region is still this client's (not unregistered or
        closed; the broker's end of the channel may still have ended it)."""
        return self._channel is not None and not self._channel.closed

    @property
    def buffer(self) -> memoryview:
        """The region's memory, writable."""
        if self._view is None:
            raise ValueError("the region is closed")
        return self._view

    def array(self, dtype: npt.DTypeLike = np.uint8, shape: Optional[Shape] = None,
              offset: int = 0) -> npt.NDArray[Any]:
        """A numpy array of `dtype` on the region's memory from byte `offset`:
        of `shape`, or as many items as fit. Writes to it are the region's."""
        if self._mm is None:
            raise ValueError("the region is closed")
        dt: np.dtype[Any] = np.dtype(dtype)
        if shape is None:
            count = (self.size - offset) // dt.itemsize
        else:
            count = int(np.prod(shape))
        a = np.frombuffer(self._mm, dtype=dt, count=count, offset=offset)
        return a.reshape(shape) if shape is not None else a

    def _range(self, type_: Literal["in", "out", "inout"], offset: int, size: int) -> Range:
        if size == 0 and 0 <= offset <= self.size:
            size = self.size - offset
        return Range(type_, self.id, offset, size)

    def in_(self, offset: int = 0, size: int = 0) -> Range:
        """An `in` argument (or buffer) of bytes [offset, offset + size) of
        the region; size 0: up to its end."""
        return self._range("in", offset, size)

    def out(self, offset: int = 0, size: int = 0) -> Range:
        """An `out` argument (or buffer): the kernel's bytes are written into
        [offset, offset + size) of the region; size 0: up to its end."""
        return self._range("out", offset, size)

    def inout(self, offset: int = 0, size: int = 0) -> Range:
        """An `inout` argument (or buffer): [offset, offset + size) of the
        region, read and written; size 0: up to its end."""
        return self._range("inout", offset, size)

    def unregister(self) -> None:
        """Ends the region now (its memory stays this process's until
        close()); Error with the broker's code when it refuses."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        try:
            if not channel.closed:
                channel.call({"op": "unregister", "region": self.id})
        finally:
            channel.release()

    def close(self) -> None:
        """Ends the region and unmaps its memory (once no array or view of
        it lives)."""
        try:
            self.unregister()
        except Error:
            pass  # ended all the same when the channel closes
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            view, self._view = self._view, None
            mm, self._mm = self._mm, None
            try:
                if view is not None:
                    view.release()
                if mm is not None:
                    mm.close()
            except BufferError:
                pass  # arrays or views of it live: unmapped with the last of them

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "gpuq.Region(id=%d, size=%d, tenant=%r)" % (self.id, self.size, self.tenant)
