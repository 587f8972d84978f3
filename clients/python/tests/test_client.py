"""The Python clients against a live gpuqd with worker test doubles (no GPU):
out buffers come back filled with (argument index + 1), inout bytes + 1."""

import asyncio
import time

import numpy as np
import pytest
import zmq

import gpuq
import gpuq.aio

KERNELS = ('#define K(name) extern "C" __global__ void name(unsigned char* a, '
           'unsigned char* b) {}\nK(k) K(slow)\n')


def test_submit_wait_returns_numpy_outputs(service):
    service.add_worker()
    with gpuq.Client(service.client_endpoint) as c:
        y = np.arange(8, dtype=np.uint8)
        job = c.submit(KERNELS, "k", grid=1, block=32,
                       args=[gpuq.InOut(y), gpuq.u32(7), gpuq.Out(shape=(2, 4), dtype=np.uint8)])
        r = c.wait(job)
        assert r.ok, r.error
        assert r.attempts == 1
        np.testing.assert_array_equal(r.outputs[0], y + 1)
        assert r.outputs[0].dtype == np.uint8
        assert r.outputs[2].shape == (2, 4)
        assert (r.outputs[2] == 3).all()
        assert r.timing["total"] >= r.timing["queue"]
        # And it stays fetchable.
        again = c.result(job)
        assert again.state == "done"
        assert again.outputs[0] == bytes(y + 1)


def test_resubmit_with_the_same_key_is_the_same_job(service):
    with gpuq.Client(service.client_endpoint) as c:
        a = c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], key="vm-1/job-1")
        b = c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], key="vm-1/job-1")
        assert a == b


def test_refusals_raise_with_the_protocol_code(service):
    with gpuq.Client(service.client_endpoint) as c:
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 2048, [gpuq.Out(4)])
        assert e.value.code == "invalid"
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], options=["-I/etc"])
        assert e.value.code == "invalid"
        with pytest.raises(gpuq.Error) as e:
            c.status(123456)
        assert e.value.code == "not_found"
        for _ in range(50):  # the tenant's queue holds 50 (no worker here)
            c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)])
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)])
        assert e.value.code == "queue_full"
        assert e.value.retry_after_ms > 0


def test_cancel_status_stats_devices(service):
    with gpuq.Client(service.client_endpoint) as c:
        job = c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], priority=7, tenant="guest-1")
        assert c.status(job).state == "queued"
        stats = c.stats()
        assert stats["queued"] == 1
        assert stats["queued_by_tenant"] == {"guest-1": 1}
        assert stats["queued_by_priority"] == {"7": 1}
        assert c.cancel(job) == "canceled"
        assert c.wait(job).state == "canceled"
        assert c.devices() == []
        service.add_worker("--uuid", "GPU-py")
        assert c.devices()[0]["device"]["uuid"] == "GPU-py"


def test_usage_by_tenant(service):
    service.add_worker()
    with gpuq.Client(service.client_endpoint) as c:
        for tenant in ("guest-1", "guest-1", "guest-2"):
            job = c.submit(KERNELS, "k", 1, 32, [gpuq.InOut(b"ab"), gpuq.Out(4)], tenant=tenant)
            assert c.wait(job).ok
        usage = c.usage()
        assert [u["tenant"] for u in usage] == ["guest-1", "guest-2"]
        assert usage[0]["done"] == 2
        assert usage[0]["bytes_in"] == 4
        assert usage[0]["bytes_out"] == 12
        assert usage[0]["gpu_us"] > 0
        assert c.usage("guest-2")[0]["done"] == 1
        assert c.usage("guest-1", since_ms=1, until_ms=3600000) == []

        async def main():
            async with gpuq.aio.Client(service.client_endpoint) as a:
                return await a.usage("guest-2")
        assert asyncio.run(main())[0]["done"] == 1


def test_many_in_flight_with_submit_async_and_poll(service):
    service.add_worker("--slots", "8")
    with gpuq.Client(service.client_endpoint) as c:
        rids = {c.submit_async(KERNELS, "k", 1, 1, [gpuq.InOut(bytes([i]))]): i
                for i in range(40)}
        accepted, done = {}, {}
        while len(done) < 40:
            event = c.poll(10)
            if event[0] == "accepted":
                accepted[event[2]] = rids[event[1]]
            elif event[0] == "result":
                done[event[1].id] = event[1]
        assert len(accepted) == 40
        for job, i in accepted.items():
            assert done[job].outputs[0] == bytes([i + 1])


def test_a_result_taken_by_wait_is_not_also_kept_for_poll(service):
    """A job that ended before wait(): the push that came during wait's
    fetch was kept as well, and poll() gave the result a second time."""
    service.add_worker()
    with gpuq.Client(service.client_endpoint) as c, \
            gpuq.Client(service.client_endpoint) as watcher:
        job = c.submit(KERNELS, "k", 1, 32, [gpuq.InOut(b"ab")])
        for _ in range(500):                 # ended, its push unread on c
            if watcher.status(job).state == "done":
                break
            time.sleep(0.005)
        assert c.wait(job).ok
        with pytest.raises(gpuq.Error) as e:
            c.poll(0.2)
        assert e.value.code == "timeout"


def test_pushed_results_no_one_takes_are_bounded(service):
    service.add_worker("--slots", "64")
    with gpuq.Client(service.client_endpoint) as c:
        c.MAX_KEPT_RESULTS = 16                # the bound, made small
        jobs = [c.submit(KERNELS, "k", 1, 32, [gpuq.InOut(b"ab")]) for _ in range(20)]
        for job in jobs:
            for _ in range(500):
                if c.status(job).state == "done":
                    break
                time.sleep(0.005)
        c.stats()                              # every push before it is read
        kept = []
        while True:
            try:
                event = c.poll(0)
            except gpuq.Error:
                break
            if event[0] == "result":
                kept.append(event[1].id)
        assert len(kept) == 16 and len(set(kept)) == 16
        for job in set(jobs) - set(kept):
            assert c.result(job).outputs[0] == b"bc", "a dropped push is fetched"


def test_compile_error_comes_back_with_the_log(service):
    service.add_worker()
    with gpuq.Client(service.client_endpoint) as c:
        job = c.submit('extern "C" __global__ void k(int* x) { oops(); }', "k", 1, 1,
                       [gpuq.Out(4)])
        r = c.wait(job)
        assert r.state == "failed"
        assert r.code == "compile_error"
        assert "oops" in r.error


def test_asyncio_client(service):
    service.add_worker("--slots", "4")

    async def main():
        async with gpuq.aio.Client(service.client_endpoint) as c:
            jobs = [await c.submit(KERNELS, "k", 1, 1,
                                   [gpuq.InOut(np.full(4, i, dtype=np.uint8))])
                    for i in range(10)]
            results = await asyncio.gather(*(c.wait(j) for j in jobs))
            for i, r in enumerate(results):
                assert r.ok
                np.testing.assert_array_equal(r.outputs[0], np.full(4, i + 1, dtype=np.uint8))
            assert (await c.stats())["finished"]["done"] == 10
    asyncio.run(main())


def test_the_broker_answers_garbage_with_an_error(service):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(service.client_endpoint)
    s.send_multipart([b"GPUQ/1", b"\x82\xa2op\xa5hello\xa3rid\x09"])
    assert s.poll(5000)
    frames = s.recv_multipart()
    h = gpuq.wire.decode(frames[1])
    assert h["op"] == "error" and h["code"] == "unknown_command" and h["rid"] == 9
    s.close()


def test_curve_binds_the_tenant_to_the_key(tmp_path):
    import json
    import os
    import subprocess
    import time
    from conftest import BIN
    broker_pub, broker_sec = zmq.curve_keypair()
    a_pub, a_sec = zmq.curve_keypair()
    (tmp_path / "broker.key").write_text(broker_sec.decode() + "\n")
    (tmp_path / "clients.keys").write_text(a_pub.decode() + " tenant-a\n")
    ready = tmp_path / "ready.json"
    p = subprocess.Popen([os.path.join(BIN, "gpuqd"), "--listen", "tcp://127.0.0.1:*",
                          "--worker-listen", "ipc://%s/w.sock" % tmp_path,
                          "--store", str(tmp_path / "j.db"), "--cache", str(tmp_path / "k.db"),
                          "--workers", "0", "--curve-secret", str(tmp_path / "broker.key"),
                          "--allowed-keys", str(tmp_path / "clients.keys"),
                          "--ready-file", str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.02)
        endpoint = json.loads(ready.read_text())["client"]
        with gpuq.Client(endpoint, curve=(broker_pub, a_pub, a_sec)) as c:
            c.submit(KERNELS, "k", 1, 1, [gpuq.Out(4)], tenant="someone-else")
            assert c.stats()["queued_by_tenant"] == {"tenant-a": 1}
        x_pub, x_sec = zmq.curve_keypair()
        with gpuq.Client(endpoint, timeout=1.0, curve=(broker_pub, x_pub, x_sec)) as c:
            with pytest.raises(gpuq.Error) as e:
                c.stats()
            assert e.value.code == "timeout"
    finally:
        p.kill()
        p.wait()


def test_local_buffers_pass_large_arrays_as_files(service):
    # On the broker's host, large buffers travel as files of its local
    # directory (PROTOCOL.md, "Local buffers"), and outputs come back mapped.
    import os
    local = os.path.join(service.folder, "jobs.db.blobs")
    service.add_worker("--local-dir", local)
    with gpuq.Client(service.client_endpoint) as c:
        y = (np.arange(3 << 18, dtype=np.uint32) * 7).view(np.uint8)  # 3 MiB
        job = c.submit(KERNELS, "k", grid=1, block=32,
                       args=[gpuq.InOut(y), gpuq.u32(7), gpuq.Out(2 << 20, dtype=np.uint8)])
        r = c.wait(job)
        assert r.ok, r.error
        np.testing.assert_array_equal(r.outputs[0], y + 1)
        assert (r.outputs[2] == 3).all() and r.outputs[2].nbytes == 2 << 20
        log = open(os.path.join(service.folder, "gpuqd.log")).read()
        assert "input 0 from local file %s/j%d.i0" % (local, job) in log
        assert "output 2 to local file" in log
        # A refused submit leaves none of its files behind.
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 2048, [gpuq.InOut(y)])
        assert e.value.code == "invalid"
        assert not [n for n in os.listdir(local) if n.startswith("c-")]
    # Without local buffers the same bytes come as frames.
    with gpuq.Client(service.client_endpoint, local_buffers=False) as c:
        r = c.wait(c.submit(KERNELS, "k", 1, 32, [gpuq.InOut(y)]))
        np.testing.assert_array_equal(r.outputs[0], y + 1)


class RawBroker:
    """A broker played by a test: a ROUTER that answers each request with
    the frames `answer(header)` gives (a list of replies, each a frame list)."""

    def __init__(self, answer):
        import threading
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._answer = answer
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        from gpuq import wire
        while not self._stop:
            if not self._sock.poll(50):
                continue
            frames = self._sock.recv_multipart()
            for reply in self._answer(wire.decode(frames[2])):
                self._sock.send_multipart([frames[0]] + reply)

    def close(self):
        self._stop = True
        self._thread.join()
        self._sock.close(0)
        self._ctx.term()


def test_the_asyncio_client_reads_on_after_a_reply_it_cannot_read():
    # One undecodable reply ended the asyncio client's reader task: every
    # later call timed out, and pushed results were never delivered.
    from gpuq import wire

    def answer(h):
        return [[wire.CLIENT_PROTOCOL, b"\xc1"],  # not msgpack
                [wire.CLIENT_PROTOCOL, wire.encode({"op": "result", "rid": 0})],  # no id
                [wire.CLIENT_PROTOCOL,
                 wire.encode({"op": "stats", "rid": h["rid"], "stats": {"queued": 3}})]]
    broker = RawBroker(answer)
    try:
        async def main():
            c = gpuq.aio.Client(broker.endpoint, timeout=5)
            try:
                assert (await c.stats())["queued"] == 3
                assert (await c.stats())["queued"] == 3
            finally:
                await c.close()
        asyncio.run(main())
    finally:
        broker.close()


def test_the_asyncio_client_keeps_no_result_it_has_given(service):
    # Every job's result stayed in the client, outputs and all, for as long
    # as it lived.
    service.add_worker("--slots", "4")

    async def main():
        async with gpuq.aio.Client(service.client_endpoint) as c:
            jobs = [await c.submit(KERNELS, "k", 1, 1, [gpuq.InOut(np.full(4, i, dtype=np.uint8))])
                    for i in range(5)]
            for j in jobs:
                assert (await c.wait(j)).ok
            assert not c._results and not c._specs
    asyncio.run(main())


def test_a_submit_that_fails_while_built_leaves_no_local_file(service):
    # The files of the inputs before the argument that failed were left in
    # the broker's local directory.
    import os
    local = os.path.join(service.folder, "jobs.db.blobs")
    service.add_worker("--local-dir", local)
    with gpuq.Client(service.client_endpoint, local_min=16) as c:
        c.devices()
        with pytest.raises(TypeError):
            c.submit(KERNELS, "k", 1, 1, [gpuq.In(bytes(64)), object()])
        assert not [n for n in os.listdir(local) if n.startswith("c-")]


def test_an_output_file_that_cannot_be_read_fails_the_result():
    # It raised FileNotFoundError out of wait() and poll() (where the event
    # was lost), where the C++ client gives a failed result.
    from gpuq.client import Result
    r = Result({"id": 4, "state": "done", "files": [["/nonexistent/gpuq-out", 65536]],
                "outputs": [0]}, [])
    assert not r.ok
    assert r.code == "io_error" and "/nonexistent/gpuq-out" in r.error


def test_a_submit_whose_message_cannot_be_encoded_leaves_no_local_file(service):
    # numpy scalars as the values of scalar arguments could not be encoded,
    # and the files of the inputs before them were left in the broker's
    # local directory (so was anything else the encoder refused).
    import os
    local = os.path.join(service.folder, "jobs.db.blobs")
    service.add_worker("--local-dir", local)

    def left():
        return [n for n in os.listdir(local) if n.startswith("c-")]
    with gpuq.Client(service.client_endpoint, local_min=16) as c:
        c.devices()
        x = np.arange(64, dtype=np.uint8)
        job = c.submit(KERNELS, "k", np.int64(1), (np.int32(32),),
                       [gpuq.InOut(x), gpuq.Scalar("u32", np.int64(3)),
                        gpuq.Scalar("f32", np.float32(1.5)), gpuq.Scalar("f64", np.int16(2))],
                       priority=np.uint8(6))
        r = c.wait(job)
        assert r.ok, r.error
        np.testing.assert_array_equal(r.outputs[0], x + 1)
        for bad in (gpuq.Scalar("u32", np.float32(3.0)), gpuq.Scalar("i64", "3"),
                    gpuq.Scalar("f32", None)):
            with pytest.raises(TypeError, match="argument 1"):
                c.submit(KERNELS, "k", 1, 1, [gpuq.In(bytes(64)), bad])
            assert not left()
        with pytest.raises(TypeError):
            c.submit(KERNELS, "k", 1, 1, [gpuq.In(bytes(64))], placement={"min_free": object()})
        assert not left()
        with pytest.raises(TypeError):
            c.submit_async(KERNELS, "k", 1, 1, [gpuq.In(bytes(64))],
                           placement={"min_free": object()})
        assert not left() and not c._pending_files
        assert c.wait(c.submit(KERNELS, "k", 1, 32, [gpuq.InOut(x)])).ok


def test_numpy_scalars_are_written_as_the_numbers_they_hold():
    from gpuq import wire
    from gpuq.client import build_submit
    job, _, _, _ = build_submit(
        KERNELS, buffers=[gpuq.Out(4)],
        launches=[gpuq.Launch("k", np.int64(2), (np.uint16(32), 1),
                              [gpuq.Buf(0), gpuq.Scalar("u8", np.uint8(7)),
                               gpuq.Scalar("f32", np.float32(2.5)),
                               gpuq.Scalar("f64", np.float64(0.25))])])
    launch = job["launches"][0]
    assert launch["grid"] == [2, 1, 1] and launch["block"] == [32, 1, 1]
    assert launch["args"] == [["buf", 0], ["u8", 7], ["f32", 2.5], ["f64", 0.25]]
    assert [type(v) for _, v in launch["args"][1:]] == [int, float, float]
    assert b"\xa2u8\x07" in wire.encode({"job": job})
    with pytest.raises(TypeError, match="launch 0, argument 1"):
        build_submit(KERNELS, buffers=[gpuq.Out(4)],
                     launches=[gpuq.Launch("k", 1, 1, [gpuq.Buf(0),
                                                       gpuq.Scalar("u8", np.float64(1))])])


def test_a_result_that_does_not_match_its_frames_is_refused(tmp_path):
    # Outputs and frames were zipped (the surplus of either dropped), an
    # output named twice kept one of its frames, and an output file longer
    # than the reply named was read as if it were right: the C++ client
    # refuses each.
    from gpuq import wire
    from gpuq.client import Result
    done = {"op": "result", "id": 4, "state": "done", "attempts": 1, "timing": {}}
    for outputs, frames in (([0, 2], [b"ab"]), ([], [b"ab"]), ([0, 0], [b"ab", b"cd"]),
                            ([-1], [b"ab"]), ("0", [b"ab"])):
        with pytest.raises(gpuq.Error) as e:
            Result(dict(done, outputs=outputs), frames)
        assert e.value.code == "malformed", outputs
    with pytest.raises(gpuq.Error) as e:
        Result(dict(done, outputs=[0], files=[["relative/out", 2]]), [])
    assert e.value.code == "invalid"
    with pytest.raises(gpuq.Error) as e:
        Result(dict(done, outputs=[0]), [b"abc"], {0: (np.dtype(np.uint16), None)})
    assert e.value.code == "malformed"
    with pytest.raises(gpuq.Error) as e:
        Result(dict(done, outputs=[0]), [b"abcd"], {0: (np.dtype(np.uint8), (3,))})
    assert e.value.code == "malformed"
    longer = tmp_path / "out"
    longer.write_bytes(bytes(100))
    r = Result(dict(done, outputs=[0], files=[[str(longer), 64]]), [])
    assert not r.ok and r.code == "io_error" and str(longer) in r.error
    assert r.outputs == {}
    empty = Result(dict(done, outputs=[0], files=[[str(tmp_path / "gone"), 0]]), [])
    assert empty.code == "io_error", "an empty output file is looked for too"
    (tmp_path / "empty").write_bytes(b"")
    r = Result(dict(done, outputs=[1, 0], files=[[str(tmp_path / "empty"), 0]]), [b"ab"])
    assert r.ok and r.outputs == {1: b"ab", 0: b""}
    longer_frames = Result(dict(done, outputs=[0]), [b"abcd"], {0: (np.dtype(np.uint8), (4,))})
    assert list(longer_frames.outputs[0]) == list(b"abcd")

    def answer(h):
        return [[wire.CLIENT_PROTOCOL, wire.encode(dict(done, rid=h["rid"], outputs=[0, 1]))],
                ]
    broker = RawBroker(answer)
    try:
        with gpuq.Client(broker.endpoint, timeout=5) as c:
            with pytest.raises(gpuq.Error) as e:
                c.result(4)
            assert e.value.code == "malformed" and "2 outputs, 0 frames" in e.value.message
    finally:
        broker.close()
