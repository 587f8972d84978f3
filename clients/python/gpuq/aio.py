"""The asyncio gpuq client: the calls of gpuq.Client as coroutines.

One reader task routes replies to the calls that wait for them (by request
id) and pushed results to wait() (by job id).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import zmq.asyncio

from gpuq import wire
from gpuq.client import (REFETCH_S, Arg, CurveKeys, Dim, Error, Header, JobBuffer, Launch,
                         OutSpecs, Result, Source, _usage_request, build_submit, open_socket,
                         raise_for)


class Client:
    """A connection to a gpuq broker for asyncio: the calls of gpuq.Client as
    coroutines. Its buffers always go through the socket."""

    def __init__(self, endpoint: Optional[str] = None, timeout: float = 10.0,
                 curve: Optional[CurveKeys] = None) -> None:
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = open_socket(self._ctx, endpoint, curve, b"a")
        self.timeout = timeout
        self._rid = 0
        self._replies: Dict[int, asyncio.Future[Tuple[Header, List[bytes]]]] = {}  # by rid
        self._results: Dict[int, asyncio.Future[Result]] = {}                       # by job id
        self._specs: Dict[int, OutSpecs] = {}
        self._reader: Optional[asyncio.Future[None]] = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        self._sock.close(0)

    def _result_future(self, job_id: int) -> asyncio.Future[Result]:
        if job_id not in self._results:
            self._results[job_id] = asyncio.get_running_loop().create_future()
        return self._results[job_id]

    async def _read(self) -> None:
        while True:
            frames: List[bytes] = await self._sock.recv_multipart()
            if len(frames) < 2 or frames[0] != wire.CLIENT_PROTOCOL:
                continue
            try:
                h = wire.decode(frames[1])
                if not isinstance(h, dict):
                    continue
                if h.get("op") == "result" and h.get("rid") == 0:
                    # Pushed: kept for a job this client submitted and has not
                    # yet waited for (wait() fetches the others).
                    fut = self._results.get(h["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(Result(h, frames[2:], self._specs.pop(h["id"], None)))
                    continue
                reply = self._replies.pop(h.get("rid", 0), None)
                if reply and not reply.done():
                    reply.set_result((h, frames[2:]))
            except Exception:  # a reply this client cannot read is dropped; the
                continue       # reader goes on (it ended, and every call timed out)

    async def _call(self, header: Header,
                    payload: Iterable[Any] = ()) -> Tuple[Header, List[bytes]]:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        self._rid += 1
        rid = self._rid
        fut: asyncio.Future[Tuple[Header, List[bytes]]] = \
            asyncio.get_running_loop().create_future()
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

    async def submit(self, source: str, entry: Optional[str] = None,
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
        """Submits a job; returns its id once the broker has stored it.
        Arguments as for gpuq.Client.submit() (a job of several launches too)."""
        job, payload, specs, _ = build_submit(
            source, entry, grid, block, args, shared=shared, key=key, tenant=tenant,
            priority=priority, deadline_ms=deadline_ms, limit_ms=limit_ms, options=options,
            headers=headers, name_expression=name_expression, placement=placement,
            launches=launches, buffers=buffers, sources=sources, graph=graph)
        h, _ = await self._call({"op": "submit", "job": job}, payload)
        job_id: int = h["id"]
        self._specs[job_id] = specs
        self._result_future(job_id)
        return job_id

    async def wait(self, job_id: int, timeout: Optional[float] = None) -> Result:
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
        # Waited for: the client keeps nothing of it (its outputs are the
        # caller's now).
        self._results.pop(job_id, None)
        self._specs.pop(job_id, None)
        return fut.result()

    async def status(self, job_id: int) -> Result:
        """The job's state (no outputs)."""
        h, frames = await self._call({"op": "status", "id": job_id})
        return Result(h, frames)

    async def cancel(self, job_id: int) -> str:
        """Cancels a job; returns its state after the cancel."""
        h, _ = await self._call({"op": "cancel", "id": job_id})
        state: str = h["state"]
        return state

    async def stats(self) -> Dict[str, Any]:
        """The broker's counters."""
        h, _ = await self._call({"op": "stats"})
        stats: Dict[str, Any] = h["stats"]
        return stats

    async def devices(self) -> List[Dict[str, Any]]:
        """The registered workers and their GPUs."""
        h, _ = await self._call({"op": "devices"})
        workers: List[Dict[str, Any]] = h["workers"]
        return workers

    async def usage(self, tenant: Optional[str] = None, since_ms: int = 0,
                    until_ms: int = 0) -> List[Dict[str, Any]]:
        """What tenants used, as gpuq.Client.usage()."""
        h, _ = await self._call(_usage_request(tenant, since_ms, until_ms))
        usage: List[Dict[str, Any]] = h["usage"]
        return usage


AsyncClient = Client  # the name gpuq exports for it
