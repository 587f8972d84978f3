"""The Python codec against schema/golden: written from schema/ alone, it must
decode every golden message and re-encode it byte for byte."""

import glob
import os

import pytest
from conftest import GOLDEN_DIR, INSTALLED

from gpuq import wire

GOLDEN = sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.bin")))


def test_there_are_golden_messages():
    if INSTALLED and not GOLDEN and "GPUQ_GOLDEN_DIR" not in os.environ:
        pytest.skip("no schema/golden next to these tests: set GPUQ_GOLDEN_DIR")
    assert len(GOLDEN) >= 20


@pytest.mark.parametrize("path", GOLDEN, ids=[os.path.basename(p) for p in GOLDEN])
def test_golden_message_round_trips(path):
    data = open(path, "rb").read()
    frames = wire.unpack_frames(data)
    name = os.path.basename(path)
    if name.startswith("region_"):
        # The region channel's messages: frame 0 names the protocol, which
        # on the wire is the channel's (its hello's), never a frame.
        assert frames[0] == wire.REGION_PROTOCOL.encode()
        assert len(frames) == 2
        message = wire.decode_region(frames[1])
        assert wire.encode_region(message) == frames[1]
        # Canonical whatever order the keys come in.
        assert wire.encode_region(dict(reversed(list(message.items())))) == frames[1]
        return
    if name.startswith("session_"):
        # The session channel's messages: one frame each on the wire.
        assert frames[0] == wire.SESSION_PROTOCOL.encode()
        assert len(frames) == 2
        assert wire.encode(wire.decode(frames[1])) == frames[1]
        return
    assert frames[0] == (wire.CLIENT_PROTOCOL if name.startswith(("client_", "reply_"))
                         else wire.WORKER_PROTOCOL)
    header = wire.decode(frames[1])
    assert wire.encode(header) == frames[1]
    assert wire.pack_frames([frames[0], wire.encode(header)] + frames[2:]) == data


def test_f32_arguments_are_encoded_as_float32():
    h = {"op": "submit", "rid": 1, "job": {"args": [["f32", 2.5], ["f64", 2.5]]}}
    raw = wire.encode(h)
    assert b"\xca\x40\x20\x00\x00" in raw      # float 32
    assert b"\xcb\x40\x04\x00\x00\x00\x00\x00\x00" in raw  # float 64


def test_region_ranges_are_written_in_canonical_form():
    assert wire.region_arg("in", 1, 0, 300) == ["in", {"region": 1, "offset": 0, "size": 300}]
    assert wire.encode({"args": [wire.region_arg("out", 1, 0, 300)]}) == (
        b"\x81\xa4args\x91\x92\xa3out\x83\xa6region\x01\xa6offset\x00\xa4size"
        b"\xcd\x01\x2c")
    with pytest.raises(ValueError):
        wire.region_arg("scratch", 1, 0, 8)
    with pytest.raises(ValueError):
        wire.region_arg("in", 1, -1, 8)


def test_region_messages_are_checked():
    hello = wire.encode_region({"op": "hello", "protocol": wire.REGION_PROTOCOL,
                                "worker": False, "token": ""})
    assert wire.decode_region(hello) == {"op": "hello", "protocol": "GPUQR/1"}
    for bad in ({"op": "hello"},                                 # protocol required
                {"op": "nope"},
                {"op": "register", "rid": 1, "size": 8, "region": 3},  # not a register field
                {"op": "register", "rid": -1, "size": 8},
                {"op": "error", "rid": 1, "code": "ok", "error": ""}):
        with pytest.raises(ValueError):
            wire.encode_region(bad)
        with pytest.raises(ValueError):
            wire.decode_region(wire.encode(bad))
    with pytest.raises(ValueError):
        wire.encode_region({"op": "error", "rid": 1, "code": "invalid", "error": "x" * 5000})
    with pytest.raises(ValueError):
        wire.decode_region(wire.encode(["hello"]))
