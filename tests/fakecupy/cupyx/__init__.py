"""Fake cupyx: only cupyx.scipy.special.erf, for the numpy-backed cupy stand-in."""
