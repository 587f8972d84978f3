"""Registered regions (PROTOCOL.md, "Regions") through a live gpuqd and the
worker test double, which maps each region as gpuq-worker does and gives its
ranges the bytes a sent buffer would get: out ranges (argument index + 1),
inout bytes + 1, in ranges untouched. No range ever comes back in a Result."""

import asyncio
import os
import signal
import time

import numpy as np
import pytest

import gpuq
import gpuq.aio

KERNELS = ('#define K(name) extern "C" __global__ void name(unsigned char* a, '
           'unsigned char* b) {}\nK(k) K(slow)\n')


def add_local_worker(service):
    """A worker test double on the broker's host: with its local directory,
    so that it takes jobs that name regions."""
    service.add_worker("--local-dir", os.path.join(service.folder, "jobs.db.blobs"))


def test_ranges_are_read_and_written_in_place_and_nothing_comes_back(service):
    add_local_worker(service)
    with gpuq.Client(service.client_endpoint) as c, c.region(1 << 20) as r:
        assert r.size == 1 << 20 and r.id != 0 and r.registered
        assert r.tenant == "default"
        b = r.buffer
        b[:4096] = bytes(i % 256 for i in range(4096))
        b[4096:12288] = b"\x55" * 8192            # the out range: overwritten
        job = c.submit(KERNELS, "k", grid=1, block=32,
                       args=[r.inout(0, 4096), gpuq.u32(7), r.out(4096, 4096), r.in_(0, 64)])
        res = c.wait(job)
        assert res.ok, res.error
        assert res.outputs == {}, "a region's bytes never travel"
        assert bytes(b[:4096]) == bytes((i + 1) % 256 for i in range(4096))
        assert bytes(b[4096:8192]) == b"\x03" * 4096
        assert bytes(b[8192:12288]) == b"\x55" * 4096, "outside every range"
        # A sent buffer and a range in one job: only the sent one comes back.
        res = c.wait(c.submit(KERNELS, "k", 1, 32,
                              [gpuq.InOut(b"xy"), gpuq.u32(1), r.out(100000, 10)]))
        assert res.ok, res.error
        assert res.outputs == {0: b"yz"}
        assert bytes(b[100000:100010]) == b"\x03" * 10
        # Size 0: up to the region's end.
        assert r.out(1000).size == r.size - 1000
        res = c.wait(c.submit(KERNELS, "k", 1, 32, [r.inout(r.size - 16)]))
        assert res.ok, res.error
        assert bytes(b[-16:]) == b"\x01" * 16
    assert not r.registered
    with pytest.raises(ValueError):
        r.buffer


def test_a_job_of_several_launches_uses_ranges_as_its_buffers(service):
    add_local_worker(service)
    with gpuq.Client(service.client_endpoint) as c, c.region(4096) as r:
        launch = gpuq.Launch("k", 1, 32, [gpuq.Buf(0), gpuq.Buf(2, 8)])
        res = c.wait(c.submit(KERNELS, buffers=[r.inout(0, 16), gpuq.Scratch(64), r.out(16, 16)],
                              launches=[launch, launch]))
        assert res.ok, res.error
        assert res.outputs == {}
        assert r.buffer[0] == 1
        assert r.buffer[16] == 3


def test_a_numpy_array_of_a_region_sees_what_jobs_write(service):
    add_local_worker(service)
    with gpuq.Client(service.client_endpoint) as c, c.region(4096) as r:
        a = r.array(np.uint8, (16, 16), offset=1024)
        a[:] = np.arange(256, dtype=np.uint8).reshape(16, 16)
        words = r.array(np.uint32)
        assert words.shape == (1024,)
        assert r.array(np.uint16, offset=4000).shape == (48,)
        res = c.wait(c.submit(KERNELS, "k", 1, 32, [r.out(0, 1024), r.inout(1024, 256)]))
        assert res.ok, res.error
        assert (words[:256] == 0x01010101).all()
        np.testing.assert_array_equal(a, (np.arange(256) + 1).astype(np.uint8).reshape(16, 16))
        assert bytes(r.buffer[1024:1026]) == b"\x01\x02"
        del a, words   # the memory is unmapped with the last array of it


def test_a_range_outside_the_region_or_of_no_region_is_refused(service):
    with gpuq.Client(service.client_endpoint) as c, c.region(4096) as r:
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 32, [r.in_(4000, 200)])
        assert e.value.code == "invalid"
        assert "outside" in e.value.message
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 32, [gpuq.Range("in", r.id ^ 1, 0, 8)])
        assert e.value.code == "not_found"
        with pytest.raises(gpuq.Error) as e:      # two ranges of one job that it writes
            c.submit(KERNELS, "k", 1, 32, [r.out(0, 100), r.inout(50, 100)])
        assert e.value.code == "invalid"
        assert c.stats()["submitted"] == 0


def test_another_tenants_region_is_no_region_at_all(service):
    with gpuq.Client(service.client_endpoint) as c, c.region(4096, tenant="alice") as r:
        assert r.tenant == "alice"
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 32, [r.in_(0, 8)], tenant="bob")
        assert e.value.code == "not_found"
        with pytest.raises(gpuq.Error) as e:      # nor is it the default tenant's
            c.submit(KERNELS, "k", 1, 32, [r.in_(0, 8)])
        assert e.value.code == "not_found"
        assert c.submit(KERNELS, "k", 1, 32, [r.in_(0, 8)], tenant="alice") > 0


def test_a_queued_job_fails_when_its_region_is_unregistered(service):
    with gpuq.Client(service.client_endpoint) as c:   # no worker: the job waits
        r = c.region(4096)
        job = c.submit(KERNELS, "k", 1, 32, [r.out(0, 16)])
        assert c.stats()["regions"][0]["jobs"] == 1
        r.unregister()
        assert not r.registered
        res = c.wait(job)
        assert res.state == "failed"
        assert res.code == "unavailable"
        assert "region %d ended (unregistered)" % r.id in res.error
        assert c.stats()["regions"] == []
        with pytest.raises(gpuq.Error) as e:
            c.submit(KERNELS, "k", 1, 32, [r.in_(0, 8)])
        assert e.value.code == "not_found"
        r.unregister()                            # once is enough
        r.buffer[0] = 7                           # the memory is still this process's
        r.close()


def test_regions_outlive_their_client_and_end_with_their_channel(service):
    c = gpuq.Client(service.client_endpoint)
    first, second = c.region(4096), c.region(8192)
    assert first.id != second.id
    c.close()
    with gpuq.Client(service.client_endpoint) as watcher:
        assert sorted(x["size"] for x in watcher.stats()["regions"]) == [4096, 8192]
        first.close()
        assert [x["size"] for x in watcher.stats()["regions"]] == [8192]
        second.close()   # the last user of the channel: it closes
        assert watcher.stats()["regions"] == []


def test_a_region_whose_register_timed_out_does_not_stay_registered(service):
    """The late answer is read before the next request, and its region
    unregistered: it counted against the tenant's regions until the
    client went away."""
    with gpuq.Client(service.client_endpoint, timeout=0.3) as c:
        kept = c.region(4096)                      # the channel is open
        service.broker.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(gpuq.Error) as e:
                c.region(4096)
        finally:
            service.broker.send_signal(signal.SIGCONT)
        assert e.value.code == "timeout"
        for _ in range(200):                       # the broker registers it
            if len(c.stats()["regions"]) == 2:
                break
            time.sleep(0.01)
        assert len(c.stats()["regions"]) == 2
        # Past what is left of the tenant's bytes unless the late one goes.
        nxt = c.region((65536 << 20) - 4096)
        assert nxt.registered
        assert sorted(x["size"] for x in c.stats()["regions"]) == [4096, (65536 << 20) - 4096]
        nxt.close()
        kept.close()


def test_region_refusals_raise_with_the_protocol_code(service):
    with gpuq.Client(service.client_endpoint) as c:
        with pytest.raises(ValueError):
            c.region(0)
        with pytest.raises(gpuq.Error) as e:
            c.region((65536 << 20) + 4096)        # past the tenant's bytes (--max-region-mb)
        assert e.value.code == "resource_exhausted"
        assert c.region(16).registered            # the channel is still good
    with gpuq.Client("tcp://127.0.0.1:1") as c:
        with pytest.raises(gpuq.Error) as e:
            c.region(4096)
        assert e.value.code == "invalid"


def test_the_asyncio_client_submits_ranges(service):
    add_local_worker(service)
    with gpuq.Client(service.client_endpoint) as c, c.region(64) as r:
        async def run():
            async with gpuq.aio.Client(service.client_endpoint) as ac:
                return await ac.wait(await ac.submit(KERNELS, "k", 1, 32, [r.out(8, 8)]))
        res = asyncio.run(run())
        assert res.ok, res.error
        assert bytes(r.buffer[:16]) == b"\x00" * 8 + b"\x01" * 8
