"""Halo exchange equals slicing the global array with periodic wrap (edges and corners too)."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py.kernels import Decomposition

COMM = MPI.COMM_WORLD


def _configs():
    out = [((16, 12, 10), {}), ((15, 9, 14), {}), ((9, 16, 7), dict(layout="pencil")), ((8, 8, 5), {})]
    if COMM.size == 4:
        out += [((16, 12, 10), dict(proc_grid=(2, 2))), ((12, 16, 6), dict(proc_grid=(4, 1))),
                ((16, 12, 10), dict(proc_grid=(1, 4)))]
    return out


def _expected(global_field, decomp, g):
    idx = [np.arange(s.start - g, s.stop + g) % n for s, n in zip(decomp.real_slice, decomp.shape)]
    return global_field[(...,) + np.ix_(*idx)]


@pytest.mark.parametrize("g", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("shape, kw", _configs(), ids=str)
def test_halo_equals_periodic_slice_of_global(shape, kw, g, dtype):
    d = Decomposition(shape, dtype=dtype, **kw)
    rng = np.random.default_rng(11)
    scalar = rng.standard_normal(shape).astype(dtype)
    vector = rng.standard_normal((3,) + shape).astype(dtype)
    if g > d.min_block_thickness() or g > shape[2]:
        with pytest.raises(ValueError, match="exceeds the thinnest local block"):
            d.exchange_halo(scalar[d.real_slice], g)
        return
    np.testing.assert_array_equal(d.exchange_halo(scalar[d.real_slice], g), _expected(scalar, d, g))
    out = np.empty((3,) + tuple(n + 2 * g for n in d.local_shape), dtype)
    res = d.exchange_halo(vector[(slice(None),) + d.real_slice], g, out=out)
    assert res is out
    np.testing.assert_array_equal(out, _expected(vector, d, g))


def test_thin_blocks_are_refused_with_a_clear_error():
    # 8 planes along axis 0 over P ranks: blocks of 8 // P planes; ask for one more than that
    d = Decomposition((8, 8, 8), layout="slab")
    g = d.min_block_thickness() + 1
    with pytest.raises(ValueError, match=r"halo width \d+ exceeds the thinnest local block .* smaller halo"):
        d.exchange_halo(d.new_scalar(), g)
    with pytest.raises(ValueError, match=">= 0"):
        d.exchange_halo(d.new_scalar(), -1)
    with pytest.raises(ValueError, match="does not match the local block"):
        d.exchange_halo(np.zeros((2, 2, 2)), 1)
