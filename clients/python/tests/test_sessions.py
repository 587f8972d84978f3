"""Sessions (PROTOCOL.md, "Sessions") through a live gpuqd, a worker test
double of its host, and session processes whose device is the test double's
memory (gpuq-fake-session: kernels known by name; `inc(buf, n, v)` adds v to
n bytes). The kernels compile for real, through the broker."""

import os
import time

import numpy as np
import pytest

import gpuq
from gpuq.client import launch_args

KERNELS = ('extern "C" __global__ void inc(unsigned char* p, unsigned n, unsigned v) {\n'
           '  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n'
           '  if (i < n) p[i] += (unsigned char)v;\n}\n'
           'extern "C" __global__ void fault(unsigned char* p) { *(volatile int*)0 = 1; }\n'
           'extern "C" __global__ void endless() { for (;;) {} }\n')


# The same tests for a client on the GPU's host, which talks to the session's
# process directly, and for one whose requests go through the broker
# (PROTOCOL.md, "Sessions through the broker").
PATHS = pytest.mark.parametrize("through", [False, True], ids=["direct", "through_broker"])


def local(service):
    service.add_worker("--local-dir", os.path.join(service.folder, "jobs.db.blobs"))


@PATHS
def test_buffers_stay_between_launches(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session(through_broker=through) as s:
        assert s.id != 0 and s.device
        a = s.alloc(256)
        assert (s.read(a, 256) == 0).all(), "a new buffer reads as zeros"
        s.write(a, np.arange(256, dtype=np.uint8))
        tickets = [s.launch_async(KERNELS, "inc", 1, 256, [gpuq.Buf(a), gpuq.u32(256),
                                                          gpuq.u32(1)]) for _ in range(50)]
        assert all(s.wait(t) > 0 for t in tickets)
        got = s.read(a, 256)
        assert (got == (np.arange(256) + 50) % 256).all()
        b = s.alloc(16)
        s.copy(b, a, 8, dst_offset=8)
        s.fill(b, 7, 8)
        assert list(s.read(b, 16)) == [7] * 8 + list(range(50, 58))
        sessions = c.stats()["sessions"]
        assert [x["session"] for x in sessions] == [s.id]
    assert c is not None


@PATHS
def test_misuse_gets_clear_errors_and_the_session_goes_on(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, \
            c.session(memory=1 << 20, through_broker=through) as s:
        a = s.alloc(100)
        with pytest.raises(gpuq.Error) as e:
            s.alloc(1 << 20)
        assert e.value.code == "resource_exhausted"
        with pytest.raises(gpuq.Error) as e:
            s.write(a, b"x" * 10, offset=95)
        assert e.value.code == "invalid"
        s.free(a)
        with pytest.raises(gpuq.Error) as e:
            s.read(a, 1)
        assert e.value.code == "not_found", "use after free"
        with pytest.raises(gpuq.Error) as e:
            s.launch("not CUDA", "inc", 1, 1, [])
        assert e.value.code == "compile_error"
        with pytest.raises(TypeError):
            s.launch(KERNELS, "inc", 1, 1, [object()])
        b = s.alloc(4)
        s.launch(KERNELS, "inc", 1, 4, [gpuq.Buf(b), gpuq.u32(4), gpuq.u32(9)])
        assert list(s.read(b, 4)) == [9] * 4


@PATHS
def test_a_fault_ends_the_session_and_another_tenants_goes_on(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        a = c.session(tenant="a", through_broker=through)
        b = c.session(tenant="b", through_broker=through)
        hb = b.alloc(8)
        b.fill(hb, 5, 8)
        ha = a.alloc(8)
        with pytest.raises(gpuq.Error) as e:
            a.launch(KERNELS, "fault", 1, 1, [gpuq.Buf(ha)])
        assert e.value.code == "session_lost"
        with pytest.raises(gpuq.Error) as e:
            a.alloc(1)
        assert e.value.code == "session_lost"
        assert list(b.read(hb, 8)) == [5] * 8
        b.close()


@PATHS
def test_a_launch_past_its_limit_ends_the_session_saying_so(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        a = c.session(tenant="a", limit_ms=200, through_broker=through)
        b = c.session(tenant="b", through_broker=through)
        hb = b.alloc(8)
        b.fill(hb, 7, 8)
        with pytest.raises(gpuq.Error) as e:
            a.launch(KERNELS, "endless", 1, 1, [])
        assert e.value.code == "session_lost"
        assert "run-time limit of 200 ms" in str(e.value)
        assert list(b.read(hb, 8)) == [7] * 8
        b.close()


@PATHS
def test_a_launchs_own_buffers_go_in_and_come_out(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        s = c.session(memory=1 << 20, through_broker=through)
        kept = s.alloc(8)
        s.fill(kept, 1, 8)
        x = np.arange(16, dtype=np.uint8).reshape(4, 4)
        got = s.run(KERNELS, "inc", 1, 16, [gpuq.InOut(x), gpuq.u32(16), gpuq.u32(2)])
        assert len(got) == 1
        assert got[0].shape == (4, 4) and got[0].dtype == np.uint8
        assert (got[0] == x + 2).all()
        zeros = s.run(KERNELS, "inc", 1, 16, [gpuq.Out(shape=(8,), dtype=np.uint8),
                                              gpuq.u32(8), gpuq.u32(7)])
        assert list(zeros[0]) == [7] * 8
        assert s.run(KERNELS, "inc", 1, 16, [gpuq.In(b"abc"), gpuq.u32(3), gpuq.u32(1)]) == []
        tickets = [s.launch_async(KERNELS, "inc", 1, 16,
                                  [gpuq.InOut(bytes([i]) * 4), gpuq.u32(4), gpuq.u32(1)])
                   for i in range(10)]
        assert [s.wait_outputs(t) for t in tickets] == [[bytes([i + 1]) * 4] for i in range(10)]
        with pytest.raises(gpuq.Error) as e:
            s.run(KERNELS, "inc", 1, 16, [gpuq.Out(4 << 20), gpuq.u32(1), gpuq.u32(1)])
        assert e.value.code == "resource_exhausted"
        assert bytes(s.read(kept, 8)) == bytes([1]) * 8
        s.close()


def test_a_launch_past_its_limit_is_found_whatever_its_rid(service):
    # The watch counts launches: rids whose low 32 bits come round again
    # (each past the one before by less than 2^31) do not hide one.
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        s = c.session(limit_ms=200)
        s.alloc(1)
        s._rid = 2**31 - 1
        s.alloc(1)
        s._rid = 2**32 - 2
        s.alloc(1)
        with pytest.raises(gpuq.Error) as e:
            s.launch(KERNELS, "endless", 1, 1, [])  # rid 2^32: its low 32 bits are 0
        assert e.value.code == "session_lost"
        assert "run-time limit" in str(e.value)


@PATHS
def test_close_through_the_broker(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        s = c.session(through_broker=through)
        with pytest.raises(gpuq.Error) as e:
            c.close_session(s.id + 1)
        assert e.value.code == "not_found"
        c.close_session(s.id)
        with pytest.raises(gpuq.Error) as e:
            s.alloc(1)
        assert e.value.code == "session_lost"


def test_untimed_launches_and_rids_that_do_not_increase(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session() as s:
        a = s.alloc(64)
        tickets = [s.launch_async(KERNELS, "inc", 1, 64, [gpuq.Buf(a), gpuq.u32(64),
                                                         gpuq.u32(2)], timed=False)
                   for _ in range(10)]
        assert [s.wait(t) for t in tickets] == [0] * 10, "untimed: no time"
        assert s.launch(KERNELS, "inc", 1, 64, [gpuq.Buf(a), gpuq.u32(64), gpuq.u32(1)]) > 0
        assert (s.read(a, 64) == 21).all()
        # A request whose rid is not past the previous one's is refused, and
        # changes nothing.
        rid = s._rid
        s._write({"op": "alloc", "rid": rid, "size": 8})
        with pytest.raises(gpuq.Error) as e:
            s._answer(rid)
        assert e.value.code == "malformed" and "not past" in str(e.value)
        assert (s.read(a, 64) == 21).all()


def test_a_kernel_is_named_by_the_handle_its_first_launch_gave(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session() as s:
        a = s.alloc(64)
        args = [gpuq.Buf(a), gpuq.u32(64), gpuq.u32(3)]
        first = s.launch_async(KERNELS, "inc", 1, 64, args)
        done = s._answer(first)
        handle = done["kernel"]
        assert handle >= 1
        m = {"op": "launch", "kernel": handle, "grid": [1, 1, 1], "block": [64, 1, 1],
             "args": launch_args(args, "", "the session's buffers (by handle)")}
        assert s._call(dict(m))["op"] == "done"
        assert (s.read(a, 64) == 6).all()
        with pytest.raises(gpuq.Error) as e:
            s._call(dict(m, kernel=handle + 100))
        assert e.value.code == "not_found"
        with pytest.raises(gpuq.Error) as e:
            s._call(dict(m, src=KERNELS, entry="inc"))
        assert e.value.code == "malformed", "by handle or by source, not both"
        assert (s.read(a, 64) == 6).all()


@PATHS
def test_the_client_names_a_kernel_by_its_handle_after_its_first_launch(service, through):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session(through_broker=through) as s:
        a = s.alloc(64)
        sent = []
        write = s._write
        s._write = lambda m: (sent.append(m), write(m))[1]
        args = [gpuq.Buf(a), gpuq.u32(64), gpuq.u32(1)]
        for _ in range(3):
            s.launch(KERNELS, "inc", 1, 64, args)
        s.launch(KERNELS, "inc", 1, 64, args, options=["-default-device"])
        s.launch(KERNELS, "inc", 1, 64, args, options=["-default-device"], timed=False)
        launches = [m for m in sent if m["op"] == "launch"]
        assert ["src" in m for m in launches] == [True, False, False, True, False]
        assert [m.get("kernel") for m in launches][1:3] == [launches[1]["kernel"]] * 2
        assert launches[4]["kernel"] != launches[1]["kernel"], "other options, other kernel"
        assert all("entry" not in m and "opts" not in m for m in launches if "kernel" in m)
        assert (s.read(a, 64) == 5).all()


def test_an_attached_region_moves_bytes_to_and_from_buffers(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session() as s, \
            c.region(1 << 16) as r:
        mem = r.array(np.uint8)
        mem[:] = np.arange(1 << 16) % 251
        h = s.attach(r)
        a = s.alloc(4096)
        s.write_from(a, h, 4096, region_offset=1000)
        s.launch(KERNELS, "inc", 16, 256, [gpuq.Buf(a), gpuq.u32(4096), gpuq.u32(1)])
        s.read_into(a, h, 4096, region_offset=20000)
        assert (mem[20000:24096] == (np.arange(1000, 5096) % 251 + 1) % 256).all()
        before = mem.copy()
        with pytest.raises(gpuq.Error) as e:
            s.read_into(a, h, 4096, region_offset=(1 << 16) - 100)
        assert e.value.code == "invalid", "past the region's end"
        with pytest.raises(gpuq.Error) as e:
            s.write_from(a, h + 9, 16)
        assert e.value.code == "not_found"
        with pytest.raises(gpuq.Error) as e:
            s._call({"op": "write", "buffer": a, "offset": 0, "data": b"x",
                     "region": h, "size": 1})
        assert e.value.code == "malformed", "data or a region, not both"
        with pytest.raises(ValueError):
            s.read_into(a, 0, 16)
        assert (mem == before).all(), "nothing changed"
        # Detached: its handle is refused from then on.
        s.detach(h)
        with pytest.raises(gpuq.Error) as e:
            s.write_from(a, h, 16)
        assert e.value.code == "not_found"
        with pytest.raises(gpuq.Error) as e:
            s.detach(h)
        assert e.value.code == "not_found"
        assert (mem == before).all(), "nothing changed"


def test_an_attach_needs_the_token_and_a_sealed_memfd(service):
    import socket
    import struct
    from gpuq import wire
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session() as s:
        def attach(token, fd):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(s._path)
            body = wire.encode({"op": "attach", "protocol": "GPUQS/1", "session": s.id,
                                "token": token, "size": 4096})
            frame = struct.pack("<I", len(body)) + body
            if fd is None:
                sock.sendall(frame)
            else:
                socket.send_fds(sock, [frame], [fd])
            data = sock.recv(65536)
            sock.close()
            return wire.decode(data[4:])
        unsealed = os.memfd_create("x", os.MFD_CLOEXEC)
        os.ftruncate(unsealed, 4096)
        try:
            m = attach(s._token, unsealed)
            assert m["op"] == "error" and m["code"] == "invalid", m
            assert "seal" in m["error"]
            m = attach("0" * 32, unsealed)
            assert m["op"] == "error" and m["code"] == "not_found", m
            m = attach(s._token, None)
            assert m["op"] == "error" and m["code"] == "invalid", m
        finally:
            os.close(unsealed)
        a = s.alloc(8)
        assert (s.read(a, 8) == 0).all(), "the session goes on"


def test_a_rid_that_jumps_by_2_31_or_more_is_refused(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session() as s:
        s.alloc(8)
        rid = s._rid + (1 << 31)
        s._write({"op": "alloc", "rid": rid, "size": 8})
        with pytest.raises(gpuq.Error) as e:
            s._answer(rid)
        assert e.value.code == "malformed"
        s.alloc(8)  # the session goes on, its rids as they were


def test_through_the_broker_untimed_launches_end_by_their_answers(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c, c.session(through_broker=True) as s:
        a = s.alloc(64)
        tickets = [s.launch_async(KERNELS, "inc", 1, 64, [gpuq.Buf(a), gpuq.u32(64),
                                                         gpuq.u32(1)], timed=False)
                   for _ in range(30)]
        assert [s.wait(t) for t in tickets] == [0] * 30
        assert (s.read(a, 64) == 30).all()
        with c.region(1 << 20) as r:
            with pytest.raises(gpuq.Error) as e:
                s.attach(r)
            assert e.value.code == "unavailable"
        assert s.alloc(8)


def test_a_session_through_the_broker_ends_with_its_connection(service):
    local(service)
    with gpuq.Client(service.client_endpoint) as c:
        s = c.session(through_broker=True)
        s.alloc(8)
        assert len(c.stats()["sessions"]) == 1
        s._relay.close(0)  # the connection goes, as a dying client's does
        s._relay = None
        for _ in range(500):
            if not c.stats()["sessions"]:
                break
            time.sleep(0.01)
        assert not c.stats()["sessions"]


def test_a_client_on_tcp_with_curve_reaches_its_session_through_the_broker(tmp_path):
    import json
    import subprocess
    import zmq
    from conftest import BIN
    broker_pub, broker_sec = zmq.curve_keypair()
    a_pub, a_sec = zmq.curve_keypair()
    (tmp_path / "broker.key").write_text(broker_sec.decode() + "\n")
    (tmp_path / "clients.keys").write_text(a_pub.decode() + " tenant-a\n")
    ready = tmp_path / "ready.json"
    procs = [subprocess.Popen(
        [os.path.join(BIN, "gpuqd"), "--listen", "tcp://127.0.0.1:*",
         "--worker-listen", "ipc://%s/w.sock" % tmp_path, "--store", str(tmp_path / "j.db"),
         "--cache", str(tmp_path / "k.db"), "--workers", "0",
         "--curve-secret", str(tmp_path / "broker.key"),
         "--allowed-keys", str(tmp_path / "clients.keys"), "--ready-file", str(ready),
         "--session-bin", os.path.join(BIN, "gpuq-fake-session")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.02)
        endpoint = json.loads(ready.read_text())["client"]
        procs.append(subprocess.Popen(
            [os.path.join(BIN, "gpuq-fake-worker"), "--broker", "ipc://%s/w.sock" % tmp_path,
             "--local-dir", str(tmp_path / "j.db.blobs")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with gpuq.Client(endpoint, curve=(broker_pub, a_pub, a_sec)) as c:
            s = None
            for _ in range(300):  # until the worker has registered
                try:
                    s = c.session()
                    break
                except gpuq.Error as e:
                    assert e.code == "unavailable", e
                    time.sleep(0.02)
            assert s is not None
            with s:
                a = s.alloc(64)
                s.write(a, np.arange(64, dtype=np.uint8))
                s.launch(KERNELS, "inc", 1, 64, [gpuq.Buf(a), gpuq.u32(64), gpuq.u32(3)])
                assert (s.read(a, 64) == np.arange(64) + 3).all()
                rows = c.stats()["sessions"]
                assert [(r["tenant"], r["relayed"]) for r in rows] == [("tenant-a", True)]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)


@PATHS
def test_a_request_of_4_gib_or_more_is_too_large_and_the_session_goes_on(service, through):
    # It raised struct.error from the framing (after copying the bytes);
    # the C++ client refuses it with too_large before sending anything.
    local(service)
    huge = np.broadcast_to(np.zeros(1, dtype=np.uint8), (1 << 32,))  # no memory of its own
    with gpuq.Client(service.client_endpoint) as c, c.session(through_broker=through) as s:
        a = s.alloc(4)
        for data in (huge, memoryview(huge)):
            with pytest.raises(gpuq.Error) as e:
                s.write(a, data)
            assert e.value.code == "too_large" and "4294967296" in e.value.message
        for arg in (gpuq.In(huge), gpuq.InOut(huge)):
            with pytest.raises(gpuq.Error) as e:
                s.run(KERNELS, "inc", 1, 4, [arg, gpuq.u32(4), gpuq.u32(1)])
            assert e.value.code == "too_large"
        s.write(a, b"\x01\x02\x03\x04")
        s.launch(KERNELS, "inc", 1, 4, [gpuq.Buf(a), gpuq.u32(4), gpuq.u32(1)])
        assert list(s.read(a, 4)) == [2, 3, 4, 5]
        assert s.run(KERNELS, "inc", 1, 4, [gpuq.InOut(b"\x00\x01"), gpuq.u32(2),
                                             gpuq.u32(3)]) == [b"\x03\x04"]
