"""gpuq: run CUDA kernels as queued jobs. See gpuq.Client (and gpuq.aio.Client
for asyncio)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from gpuq.client import (Arg, Buf, Client, Error, In, InOut, Launch, Out, Range, Result, Scalar,
                         Scratch, Source, default_endpoint, f32, f64, i8, i16, i32, i64, u8, u16,
                         u32, u64)
from gpuq.region import Region
from gpuq.session import Session

if TYPE_CHECKING:
    from gpuq.aio import AsyncClient

__all__ = ["Client", "AsyncClient", "Error", "Result", "In", "InOut", "Out", "Scalar", "Arg",
           "Launch", "Source", "Scratch", "Buf", "Region", "Range", "Session", "default_endpoint", "u8",
           "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "__version__"]


def _find_version() -> str:
    """The version of this copy of gpuq: the installed distribution's when
    this is the copy it installed, else the VERSION file of the source tree
    this was imported from (clients/python/VERSION)."""
    from importlib import metadata

    here = os.path.dirname(os.path.realpath(__file__))
    try:
        dist = metadata.distribution("gpuq")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        installed = os.path.realpath(str(dist.locate_file("gpuq/__init__.py")))
        if installed == os.path.join(here, "__init__.py"):
            return dist.version
    try:
        with open(os.path.join(here, os.pardir, "VERSION"), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return dist.version if dist is not None else "0+unknown"


__version__: str = _find_version()


def __getattr__(name: str) -> Any:
    # gpuq.AsyncClient, imported on first use (it brings in asyncio).
    if name == "AsyncClient":
        from gpuq.aio import AsyncClient
        return AsyncClient
    raise AttributeError("module 'gpuq' has no attribute %r" % name)
