"""Fake cupyx.scipy: only cupyx.scipy.special.erf, for the numpy-backed cupy stand-in."""
from . import special  # noqa: F401  (import cupyx.scipy; cupyx.scipy.special works, as on CuPy)
