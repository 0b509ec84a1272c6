"""Numba arithmetic of the kernels layer: arrays and numbers in, arrays out, never MPI.

Each kernel is a ``_name`` ``@njit`` loop that writes into ``out``, plus a ``name`` wrapper
that checks dtypes, shapes and contiguity, allocates ``out`` when it is ``None`` and returns
it. Only numpy and numba may be imported here (held by ``tests/test_layers.py``).
"""
