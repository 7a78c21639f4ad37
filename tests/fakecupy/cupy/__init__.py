"""A numpy-backed stand-in for CuPy, for tests on machines without a GPU.

Device arrays are their own type, `ndarray`, a wrapper around a plain numpy array that is as strict as CuPy,
or stricter, about the host/device boundary:

- operators and methods between device arrays and Python or numpy scalars work and return device arrays;
- a numpy function or ufunc called on a device array raises TypeError (`__array_function__` raises and
  `__array_ufunc__ = None`), as does mixing a host ndarray into an operation or assigning one into a device
  array (real CuPy accepts `dev[...] = host`; code that wants to run on both must call `xp.asarray` first);
- implicit conversion to a host array (`numpy.asarray(dev)`, `host[...] = dev`) raises TypeError; `asnumpy`
  and `ndarray.get()` are the ways back to the host;
- `float(dev)`, `bool(dev)` and `len(dev)` work, as on CuPy (where they synchronize).

Every computation runs the very numpy operation the numpy backend would, on the unwrapped data, so results
are bitwise those of numpy. `cuda.runtime.getDeviceCount()` returns $FAKE_CUPY_DEVICES (default 1); the
value "error" makes it raise like a machine without a driver.
"""
from __future__ import annotations

import os
import types

import numpy

__version__ = "0.0.0-fake"
FAKE = True  # so a test can tell this stand-in from the real CuPy

float16, float32, float64 = numpy.float16, numpy.float32, numpy.float64
int8, int16, int32, int64 = numpy.int8, numpy.int16, numpy.int32, numpy.int64
uint8, uint32, uint64 = numpy.uint8, numpy.uint32, numpy.uint64
bool_ = numpy.bool_
dtype = numpy.dtype
newaxis = None
pi, e, inf, nan = numpy.pi, numpy.e, numpy.inf, numpy.nan

_SCALARS = (bool, int, float, complex, numpy.generic)
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


def _unwrap(value, what="operand"):
    """The numpy data of a device array; scalars pass; a host array (or anything else) is refused."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"Unsupported type {type(value)} as {what}: fake cupy takes device arrays "
                    f"(cupy.ndarray) and scalars only; move host data with cupy.asarray")


def _wrap(value):
    """numpy result -> device array; numpy scalars become 0-d device arrays, as CuPy's reductions return."""
    if isinstance(value, numpy.ndarray):
        return ndarray(value)
    if isinstance(value, numpy.generic):
        return ndarray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def _out(out):
    if out is None:
        return None
    if not isinstance(out, ndarray):
        raise TypeError(f"out must be a cupy.ndarray, not {type(out)}")
    return out._a


def _index(key):
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, numpy.ndarray):
        raise TypeError("fake cupy: index with a host ndarray; use cupy.asarray first")
    return key


class ndarray:
    """A device array: a numpy array that numpy itself may not touch."""

    __slots__ = ("_a", "__weakref__")
    __array_ufunc__ = None  # numpy.<ufunc>(device) raises; numpy's own operators defer to ours
    __array_priority__ = 100

    def __init__(self, data):
        assert type(data) is numpy.ndarray, type(data)
        self._a = data

    # -- the host/device boundary --
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a cupy.ndarray: use the cupy function (xp.{func.__name__})")

    def get(self):
        return self._a.copy()

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(numpy.asarray(self._a[i])) if self._a.ndim == 1 else ndarray(self._a[i])
                for i in range(len(self._a)))

    def __repr__(self):
        return "fakecupy." + repr(self._a)

    __str__ = __repr__

    # -- attributes and methods --
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        self._a[_index(key)] = _unwrap(value, "value assigned into a cupy.ndarray")

    def reshape(self, *shape, order="C"):
        return ndarray(self._a.reshape(*shape, order=order))

    def ravel(self):
        return ndarray(self._a.ravel())

    def transpose(self, *axes):
        return ndarray(self._a.transpose(*axes))

    def astype(self, dtype, copy=True):
        return ndarray(self._a.astype(dtype, copy=copy))

    def copy(self):
        return ndarray(self._a.copy())

    def view(self, dtype=None):
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    def fill(self, value):
        self._a.fill(_unwrap(value))

    def take(self, indices, axis=None, out=None):
        return _wrap(self._a.take(_unwrap(indices, "indices"), axis=axis, out=_out(out)))

    def all(self, axis=None):
        return _wrap(self._a.all(axis=axis))

    def any(self, axis=None):
        return _wrap(self._a.any(axis=axis))

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(self._a.sum(axis=axis, dtype=dtype, out=_out(out), keepdims=keepdims))

    def mean(self, axis=None, dtype=None, keepdims=False):
        return _wrap(self._a.mean(axis=axis, dtype=dtype, keepdims=keepdims))

    def max(self, axis=None):
        return _wrap(self._a.max(axis=axis))

    def min(self, axis=None):
        return _wrap(self._a.min(axis=axis))

    def dot(self, other):
        return _wrap(self._a.dot(_unwrap(other)))

    __hash__ = None


def _binary(name):
    def op(self, other):
        result = getattr(self._a, name)(_unwrap(other))
        return NotImplemented if result is NotImplemented else _wrap(result)
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other))  # in place on the data: views see the change
        return self
    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        return _wrap(getattr(self._a, name)())
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(ndarray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", _unary(f"__{_name}__"))
del _name


# ---- to and from the host ----

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == numpy.dtype(dtype) else a.astype(dtype)
    return ndarray(numpy.array(a, dtype=dtype, order=order or "K", copy=True))  # a transfer copies


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(numpy.array(a._a, dtype=dtype, copy=copy, order=order))
    return ndarray(numpy.array(a, dtype=dtype, copy=True, order=order))


def asnumpy(a, stream=None, order="C", out=None):
    """The one way back to the host (host arrays pass through, as on CuPy)."""
    if isinstance(a, ndarray):
        if out is not None:
            out[...] = a._a
            return out
        return numpy.array(a._a, order=order, copy=True)
    return numpy.asarray(a, order=order)


def get_array_module(*args):
    return _this if any(isinstance(a, ndarray) for a in args) else numpy


# ---- creation ----

def _creation(fn):
    def create(shape, dtype=float, order="C"):
        return ndarray(fn(shape, dtype=dtype, order=order))
    create.__name__ = fn.__name__
    return create


zeros, ones, empty = _creation(numpy.zeros), _creation(numpy.ones), _creation(numpy.empty)


def full(shape, fill_value, dtype=None, order="C"):
    return ndarray(numpy.full(shape, _unwrap(fill_value), dtype=dtype, order=order))


def _like(fn):
    def create(a, dtype=None, order="K", shape=None):
        if not isinstance(a, ndarray):
            raise TypeError(f"{fn.__name__}: expected a cupy.ndarray, got {type(a)}")
        return ndarray(fn(a._a, dtype=dtype, order=order, shape=shape))
    create.__name__ = fn.__name__
    return create


zeros_like, ones_like, empty_like = _like(numpy.zeros_like), _like(numpy.ones_like), _like(numpy.empty_like)


def arange(*args, dtype=None):
    return ndarray(numpy.arange(*args, dtype=dtype))


# ---- math: the numpy function on the unwrapped data, device arrays and scalars only ----

def _function(fn):
    def call(*args, out=None, **kwargs):
        if out is not None:
            kwargs["out"] = _out(out)
        return _wrap(fn(*(_unwrap(a) for a in args), **kwargs))
    call.__name__ = fn.__name__
    call.__doc__ = f"numpy.{fn.__name__} on device arrays"
    return call


for _name in ("maximum", "minimum", "where", "tanh", "exp", "expm1", "log", "log1p", "sign", "sqrt", "square",
              "abs", "absolute", "negative", "dot", "vdot", "matmul", "isfinite", "isnan", "isinf", "clip",
              "add", "subtract", "multiply", "divide", "true_divide", "power", "sin", "cos", "tensordot", "outer",
              "greater", "less", "equal", "logical_and", "logical_or", "logical_not", "sum", "mean", "prod",
              "amax", "amin", "max", "min", "argmax", "argmin", "all", "any", "ptp", "cumsum", "concatenate",
              "stack", "take"):
    if _name in ("concatenate", "stack"):
        globals()[_name] = (lambda fn: lambda arrays, axis=0: ndarray(fn([_unwrap(a) for a in arrays], axis=axis)))(
            getattr(numpy, _name))
    else:
        globals()[_name] = _function(getattr(numpy, _name))
del _name


# ---- the CUDA runtime, as far as the sidecar and benchmarks/gpu_check.py look at it ----

class CUDARuntimeError(RuntimeError):
    pass


def _device_count():
    value = os.environ.get("FAKE_CUPY_DEVICES", "1")
    if value == "error":
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected (fake)")
    return int(value)


class _Device:
    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        pass

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(
        getDeviceCount=_device_count,
        getDeviceProperties=lambda device: {"name": b"fake cupy (numpy on the host)", "totalGlobalMem": 0},
        deviceSynchronize=lambda: None,
        CUDARuntimeError=CUDARuntimeError,
    ),
    Device=_Device,
    is_available=lambda: _device_count() > 0,
)

import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
