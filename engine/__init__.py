"""openmlx engine: finds, checks, loads and runs models. Never imports a web framework.

OpenBLAS must be loaded before mlx.core is imported (see engine.blas), so it happens here,
before any engine module can import mlx.
"""
from engine import blas as _blas

_blas.activate()
