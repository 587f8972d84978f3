"""gpuq: run CUDA kernels as queued jobs. See gpuq.Client."""

from gpuq.client import (Client, Error, Result, In, InOut, Out, default_endpoint,
                         u8, i8, u16, i16, u32, i32, u64, i64, f32, f64)

__all__ = ["Client", "Error", "Result", "In", "InOut", "Out", "default_endpoint",
           "u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"]
