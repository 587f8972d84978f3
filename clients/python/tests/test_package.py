"""The package itself: its version, and which copy of it the tests use."""

import os

import pytest
from conftest import INSTALLED, SOURCE, VERSION_FILE

import gpuq


def test_version_is_the_version_file():
    if not os.path.exists(VERSION_FILE):
        if INSTALLED and "GPUQ_VERSION_FILE" not in os.environ:
            pytest.skip("no VERSION at %s (tests copied out of the repository?): "
                        "set GPUQ_VERSION_FILE" % VERSION_FILE)
        pytest.fail("no VERSION at %s" % VERSION_FILE)
    with open(VERSION_FILE, encoding="utf-8") as f:
        assert gpuq.__version__ == f.read().strip()


@pytest.mark.skipif(not INSTALLED, reason="GPUQ_TEST_INSTALLED=1 tests the installed package")
def test_the_installed_package_is_the_one_tested():
    from importlib import metadata

    package = os.path.realpath(os.path.dirname(gpuq.__file__))
    source = os.path.realpath(os.path.join(SOURCE, "gpuq"))   # clients/python/gpuq
    assert os.path.commonpath([package, source]) != source, \
        "gpuq was imported from the source tree %s, not the installed package" % source
    # ... and is the copy that the installed distribution gpuq put there.
    dist = metadata.distribution("gpuq")
    assert (os.path.realpath(str(dist.locate_file("gpuq/__init__.py"))) ==
            os.path.realpath(gpuq.__file__))
    assert gpuq.__version__ == dist.version
    assert os.path.exists(os.path.join(package, "py.typed"))


@pytest.mark.skipif(INSTALLED, reason="tests the source tree")
def test_the_source_tree_is_the_one_tested():
    package = os.path.realpath(os.path.dirname(gpuq.__file__))
    assert package == os.path.realpath(os.path.join(SOURCE, "gpuq"))
    assert os.path.exists(os.path.join(package, "py.typed"))


def test_public_names():
    for name in gpuq.__all__:
        assert getattr(gpuq, name) is not None
    from gpuq import aio
    assert gpuq.AsyncClient is aio.Client is aio.AsyncClient
    assert isinstance(gpuq.u32(7), gpuq.Scalar)
    with pytest.raises(ValueError):
        gpuq.u8(256)
