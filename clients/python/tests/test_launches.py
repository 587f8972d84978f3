"""Jobs of several launches (PROTOCOL.md, "Jobs of several launches") from the
Python clients: their canonical encoding, and runs against a live gpuqd with
worker test doubles, which return each out buffer i filled with (i + 1), each
inout buffer with its input's size, never a scratch buffer, and one launch
time (1 µs) per launch, none for a job run as a CUDA graph."""

import asyncio
import glob
import os

import msgpack
import numpy as np
import pytest
from conftest import GOLDEN_DIR

import gpuq
import gpuq.aio
from gpuq import wire
from gpuq.client import build_submit

KERNELS = ('#define K(name) extern "C" __global__ void name(unsigned char* a, '
           'unsigned char* b) {}\nK(k) K(slow)\n')
# A second source: a template launched by a name expression, and a macro
# that its own option defines.
SECOND = ('template <int N> __global__ void scale(unsigned char* a, unsigned char* b, '
          'float f) {}\nstatic_assert(STEP == 2, "the source\'s option");\n')


def several(x, y, graph=False):
    """A job of three launches over four buffers, two sources, as keywords."""
    return dict(
        sources=[gpuq.Source(SECOND, options=["-DSTEP=2"])],
        buffers=[gpuq.In(x), gpuq.Out(shape=(2, 4), dtype=np.uint8), gpuq.Scratch(64),
                 gpuq.InOut(y)],
        launches=[gpuq.Launch("k", 1, 32, [gpuq.Buf(0), gpuq.Buf(2)]),
                  gpuq.Launch("scale<2>", (2, 1), 64, [gpuq.Buf(2, 16), gpuq.Buf(1), gpuq.f32(2.5)],
                              source=1, shared=256, name_expression=True),
                  gpuq.Launch("k", 1, 32, [gpuq.Buf(1, 4), gpuq.Buf(3)])],
        graph=graph)


def test_a_job_of_several_launches_is_encoded_in_canonical_form():
    x = b"\x09" * 16
    y = np.arange(4, dtype=np.uint8)
    job, payload, specs, made = build_submit(KERNELS, key="j-1", priority=7,
                                             options=["-DSTEP=1"], **several(x, y, graph=True))
    assert made == []
    # Keys in the order of PROTOCOL.md's tables; defaults left out.
    assert list(job) == ["key", "priority", "src", "opts", "sources", "buffers", "launches",
                         "graph"]
    assert job["sources"] == [{"src": SECOND, "opts": ["-DSTEP=2"]}]
    assert job["buffers"] == [["in", 0], ["out", 8], ["scratch", 64], ["inout", 1]]
    assert [list(m) for m in job["launches"]] == [
        ["entry", "grid", "block", "args"],
        ["source", "entry", "expr", "grid", "block", "shared", "args"],
        ["entry", "grid", "block", "args"]]
    assert job["launches"][0]["args"] == [["buf", 0], ["buf", 2]]
    assert job["launches"][1] == {"source": 1, "entry": "scale<2>", "expr": True,
                                  "grid": [2, 1, 1], "block": [64, 1, 1], "shared": 256,
                                  "args": [["buf", [2, 16]], ["buf", 1], ["f32", 2.5]]}
    assert [bytes(p) for p in payload] == [x, y.tobytes()]
    assert set(specs) == {1, 3}, "outputs are by buffer index"
    raw = wire.encode({"op": "submit", "rid": 1, "job": job})
    assert b"\xa3f32\xca\x40\x20\x00\x00" in raw, "a launch's f32 is a msgpack float 32"
    assert b"\xa3buf\x92\x02\x10" in raw, "[buf, [index, offset]] in its smallest form"
    assert msgpack.unpackb(raw)["job"] == job


def _rebuild(header, frames):
    """The same submit made again through the Python API from a decoded
    golden header: build_submit must write the same bytes."""
    job = header["job"]

    def buffer(a):
        kind, v = a
        if isinstance(v, dict):  # a range of a registered region
            return gpuq.Range(kind, v["region"], v["offset"], v["size"])
        if kind == "in":
            return gpuq.In(frames[v])
        if kind == "inout":
            return gpuq.InOut(frames[v])
        if kind == "out":
            return gpuq.Out(v)
        if kind == "scratch":
            return gpuq.Scratch(v)
        return gpuq.Scalar(kind, v)

    def launch_arg(a):
        if a[0] == "buf":
            return gpuq.Buf(*a[1]) if isinstance(a[1], list) else gpuq.Buf(a[1])
        return gpuq.Scalar(*a)

    kw = dict(key=job.get("key"), tenant=job.get("tenant"), priority=job.get("priority", 5),
              deadline_ms=job.get("deadline_ms", 0), limit_ms=job.get("limit_ms", 0),
              options=job.get("opts"), headers=dict(job.get("headers", [])),
              placement=job.get("place"))
    if "launches" in job:
        kw.update(
            buffers=[buffer(a) for a in job["buffers"]],
            sources=[gpuq.Source(s["src"], s.get("opts"), dict(s.get("headers", [])))
                     for s in job.get("sources", [])],
            launches=[gpuq.Launch(m["entry"], m["grid"], m["block"],
                                  [launch_arg(a) for a in m["args"]], shared=m.get("shared", 0),
                                  source=m.get("source", 0), name_expression=m.get("expr", False))
                      for m in job["launches"]],
            graph=job.get("graph", False))
    else:
        kw.update(entry=job["entry"], grid=job["grid"], block=job["block"],
                  args=[buffer(a) for a in job["args"]], shared=job.get("shared", 0),
                  name_expression=job.get("expr", False))
    built, payload, _, _ = build_submit(job["src"], **kw)
    return {"op": "submit", "rid": header["rid"], "job": built}, payload


GOLDEN_SUBMITS = sorted(glob.glob(os.path.join(GOLDEN_DIR, "client_submit*.bin")))


@pytest.mark.parametrize("path", GOLDEN_SUBMITS,
                         ids=[os.path.basename(p) for p in GOLDEN_SUBMITS])
def test_submits_built_by_the_client_are_the_golden_bytes(path):
    frames = wire.unpack_frames(open(path, "rb").read())
    header = wire.decode(frames[1])
    if "files" in header["job"]:
        pytest.skip("local files are named by the client's own random names")
    rebuilt, payload = _rebuild(header, frames[2:])
    assert wire.encode(rebuilt) == frames[1]
    assert [bytes(p) for p in payload] == frames[2:]


def test_a_result_of_several_launches_reads_as_the_golden_message_says():
    path = os.path.join(GOLDEN_DIR, "reply_result_launches.bin")
    if not os.path.exists(path):
        pytest.skip("no %s" % path)
    frames = wire.unpack_frames(open(path, "rb").read())
    r = gpuq.Result(wire.decode(frames[1]), frames[2:], {2: (np.dtype(np.float32), None)})
    assert r.ok
    assert r.timing["launches"] == [9, 3, 2]
    assert r.timing["kernel"] == 14
    assert list(r.outputs) == [2], "outputs by buffer index"
    assert r.outputs[2].dtype == np.float32 and r.outputs[2].shape == (1,)


def test_a_job_of_several_launches_runs_and_returns_its_buffers(service):
    service.add_worker()
    with gpuq.Client(service.client_endpoint) as c:
        x = np.full(16, 9, dtype=np.uint8)
        y = np.arange(4, dtype=np.uint8)
        job = c.submit(KERNELS, **several(x, y))
        r = c.wait(job)
        assert r.ok, r.error
        assert r.timing["launches"] == [1, 1, 1]
        assert sorted(r.outputs) == [1, 3], "out and inout come back, in and scratch do not"
        assert r.outputs[1].shape == (2, 4) and (r.outputs[1] == 2).all()
        assert r.outputs[3].dtype == np.uint8 and r.outputs[3].shape == (4,)
        again = c.result(job)
        assert again.timing["launches"] == [1, 1, 1]
        assert again.outputs[1] == b"\x02" * 8
        # As a CUDA graph: the same outputs; the timing is the launches' span.
        graphed = c.wait(c.submit(KERNELS, **several(x, y, graph=True)))
        assert graphed.ok, graphed.error
        assert "launches" not in graphed.timing and "kernel" in graphed.timing
        np.testing.assert_array_equal(graphed.outputs[1], r.outputs[1])
        # Pipelined, as the other submits.
        rid = c.submit_async(KERNELS, launches=[gpuq.Launch("k", 1, 1, [gpuq.Buf(0)])],
                             buffers=[gpuq.Out(4)])
        event = c.poll()
        while event[0] == "result":  # pushes of the jobs above, fetched before they came
            event = c.poll()
        assert event[0] == "accepted" and event[1] == rid
        assert c.wait(event[2]).outputs[0].tobytes() == b"\x01" * 4


def test_the_calls_that_do_not_fit_a_job_are_refused(service):
    with gpuq.Client(service.client_endpoint) as c:
        one = gpuq.Launch("k", 1, 1, [gpuq.Buf(0)])
        with pytest.raises(TypeError, match="belong to jobs of several launches"):
            c.submit(KERNELS, "k", 1, 1, [gpuq.Buf(0)])
        with pytest.raises(TypeError, match="belong to jobs of several launches"):
            c.submit(KERNELS, "k", 1, 1, [gpuq.Scratch(4)])
        with pytest.raises(TypeError, match="belong to jobs of several launches"):
            c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], graph=True)
        with pytest.raises(TypeError, match="in its launches"):
            c.submit(KERNELS, "k", launches=[one], buffers=[gpuq.Out(4)])
        with pytest.raises(TypeError, match="launch 0, argument 0"):
            c.submit(KERNELS, launches=[gpuq.Launch("k", 1, 1, [gpuq.Out(4)])])
        with pytest.raises(TypeError, match="buffer 1"):
            c.submit(KERNELS, launches=[one], buffers=[gpuq.Out(4), gpuq.u32(1)])
        with pytest.raises(ValueError, match="at least one launch"):
            c.submit(KERNELS, launches=[], buffers=[gpuq.Out(4)])
        with pytest.raises(TypeError, match="entry, grid, block and args"):
            c.submit(KERNELS, "k")
        # What only the broker can tell: a buffer the job does not declare.
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, launches=[gpuq.Launch("k", 1, 1, [gpuq.Buf(5)])],
                     buffers=[gpuq.Out(4)])
        assert e.value.code == "invalid" and "buffer 5" in e.value.message


def test_the_asyncio_client_submits_several_launches(service):
    service.add_worker()

    async def main():
        async with gpuq.aio.Client(service.client_endpoint) as c:
            y = np.arange(4, dtype=np.uint8)
            r = await c.wait(await c.submit(KERNELS, **several(b"\x09" * 16, y)))
            assert r.ok, r.error
            assert r.timing["launches"] == [1, 1, 1]
            assert (r.outputs[1] == 2).all() and r.outputs[1].shape == (2, 4)
    asyncio.run(main())


def test_large_buffers_of_several_launches_pass_as_files(service):
    local = os.path.join(service.folder, "jobs.db.blobs")
    service.add_worker("--local-dir", local)
    with gpuq.Client(service.client_endpoint, local_min=1 << 16) as c:
        x = np.arange(1 << 17, dtype=np.uint32).view(np.uint8)  # 512 KiB
        job = c.submit(KERNELS,
                       buffers=[gpuq.Scratch(1 << 20), gpuq.InOut(x), gpuq.Out(1 << 17)],
                       launches=[gpuq.Launch("k", 1, 32, [gpuq.Buf(1), gpuq.Buf(0)]),
                                 gpuq.Launch("k", 1, 32, [gpuq.Buf(0, 4096), gpuq.Buf(2)])])
        r = c.wait(job)
        assert r.ok, r.error
        assert sorted(r.outputs) == [1, 2]
        assert r.outputs[1].dtype == np.uint8 and r.outputs[1].shape == x.shape
        assert r.outputs[2].nbytes == 1 << 17 and (r.outputs[2] == 3).all()
        log = open(os.path.join(service.folder, "gpuqd.log")).read()
        assert "input 1 from local file" in log
        assert "output 2 to local file" in log
