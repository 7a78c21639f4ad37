"""Fake cupyx.scipy.special: erf on device arrays of the numpy-backed cupy stand-in.

math.erf elementwise (exact to an ulp), rounded to the input's floating dtype: float32 in, float32 out, as
CuPy's ufunc returns (integers give float64). Host arrays are refused, as by a CuPy ufunc.
"""
from __future__ import annotations

import math

import numpy

import cupy

_erf = numpy.frompyfunc(math.erf, 1, 1)


def erf(x):
    if not isinstance(x, cupy.ndarray):
        if isinstance(x, (bool, int, float, numpy.generic)):
            x = cupy.asarray(x)
        else:
            raise TypeError(f"Unsupported type {type(x)}: cupyx.scipy.special.erf takes cupy.ndarray")
    data = x._a
    dtype = data.dtype if data.dtype.kind == "f" else numpy.dtype(numpy.float64)
    return cupy.ndarray(numpy.asarray(_erf(data), dtype=numpy.float64).astype(dtype))
