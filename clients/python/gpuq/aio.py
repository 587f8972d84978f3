"""The asyncio gpuq client: the calls of gpuq.Client as coroutines.

One reader task routes replies to the calls that wait for them (by request
id) and pushed results to wait() (by job id).
"""

import asyncio

import zmq.asyncio

from gpuq import wire
from gpuq.client import REFETCH_S, Error, Result, build_submit, open_socket, raise_for


class Client:
    def __init__(self, endpoint=None, timeout=10.0, curve=None):
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = open_socket(self._ctx, endpoint, curve, b"a")
        self.timeout = timeout
        self._rid = 0
        self._replies = {}   # rid -> future
        self._results = {}   # job id -> future
        self._specs = {}
        self._reader = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._reader:
            self._reader.cancel()
        self._sock.close(0)

    def _result_future(self, job_id):
        if job_id not in self._results:
            self._results[job_id] = asyncio.get_running_loop().create_future()
        return self._results[job_id]

    async def _read(self):
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) < 2 or frames[0] != wire.CLIENT_PROTOCOL:
                continue
            h = wire.decode(frames[1])
            if h.get("op") == "result" and h.get("rid") == 0:
                fut = self._result_future(h["id"])
                if not fut.done():
                    fut.set_result(Result(h, frames[2:], self._specs.pop(h["id"], None)))
                continue
            fut = self._replies.pop(h.get("rid"), None)
            if fut and not fut.done():
                fut.set_result((h, frames[2:]))

    async def _call(self, header, payload=()):
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        self._rid += 1
        rid = self._rid
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        header = dict(op=header.pop("op"), rid=rid, **header)
        await self._sock.send_multipart([wire.CLIENT_PROTOCOL, wire.encode(header)] + list(payload))
        try:
            h, frames = await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            self._replies.pop(rid, None)
            raise Error("timeout", "no answer from the broker in time")
        raise_for(h)
        return h, frames

    async def submit(self, source, entry, grid, block, args, **kw):
        job, payload, specs, _ = build_submit(source, entry, grid, block, args, **kw)
        h, _ = await self._call({"op": "submit", "job": job}, payload)
        self._specs[h["id"]] = specs
        self._result_future(h["id"])
        return h["id"]

    async def wait(self, job_id, timeout=None):
        """The Result of a job, waiting for it to end: pushed, or fetched
        (at once, and again every second: a push reaches only the connection
        that submitted the job, in the broker's lifetime)."""
        fut = self._result_future(job_id)
        deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
        while not fut.done():
            h, frames = await self._call({"op": "result", "id": job_id})
            if h.get("op") == "result" and not fut.done():
                fut.set_result(Result(h, frames, self._specs.pop(job_id, None)))
                break
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise Error("timeout", "no answer from the broker in time")
            try:
                await asyncio.wait_for(asyncio.shield(fut), min(left, REFETCH_S))
            except asyncio.TimeoutError:
                pass
        return fut.result()

    async def status(self, job_id):
        h, frames = await self._call({"op": "status", "id": job_id})
        return Result(h, frames)

    async def cancel(self, job_id):
        h, _ = await self._call({"op": "cancel", "id": job_id})
        return h["state"]

    async def stats(self):
        h, _ = await self._call({"op": "stats"})
        return h["stats"]

    async def devices(self):
        h, _ = await self._call({"op": "devices"})
        return h["workers"]
