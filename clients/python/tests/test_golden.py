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
