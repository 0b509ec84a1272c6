"""Decomposition: layouts, wavenumbers, allocation, reductions, gather/scatter, bad input."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py.kernels import Decomposition
from claire_py.kernels.decomposition import choose_proc_grid

COMM = MPI.COMM_WORLD
SHAPES = [(16, 12, 10), (15, 9, 14), (8, 8, 8), (12, 17, 9)]


def _layouts():
    out = [dict(layout="auto"), dict(layout="slab"), dict(layout="pencil")]
    if COMM.size == 4:
        out.append(dict(proc_grid=(2, 2)))
        out.append(dict(proc_grid=(1, 4)))
    return out


@pytest.mark.parametrize("kw", _layouts(), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blocks_tile_the_grid_in_both_layouts(shape, kw):
    d = Decomposition(shape, **kw)
    for spectral, gshape in ((False, d.shape), (True, d.spectral_shape)):
        count = np.zeros(gshape, int)
        sl = d.spectral_slice if spectral else d.real_slice
        count[sl] += 1
        total = np.zeros_like(count)
        COMM.Allreduce(count, total)
        assert (total == 1).all()
    assert d.local_shape[2] == shape[2], "axis 2 is whole in the real layout"
    assert d.spectral_slice[0] == slice(0, shape[0]), "axis 0 is whole in the spectral layout"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_local_wavenumbers_match_numpy_fft(shape):
    d = Decomposition(shape)
    ref = [np.fft.fftfreq(shape[0], 1 / shape[0]), np.fft.fftfreq(shape[1], 1 / shape[1]),
           np.fft.rfftfreq(shape[2], 1 / shape[2])]
    for k, r, s in zip(d.local_wavenumbers(), ref, d.spectral_slice):
        np.testing.assert_array_equal(k, r[s])
    for a, (k, r, s) in enumerate(zip(d.local_wavenumbers(zero_nyquist=True), ref, d.spectral_slice)):
        n = shape[a]
        expected = np.where((n % 2 == 0) & (np.abs(r) == n // 2), 0.0, r)[s]
        np.testing.assert_array_equal(k, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_is_normalised_rfftn(shape, dtype):
    d = Decomposition(shape, dtype=dtype)
    g = np.random.default_rng(1).standard_normal(shape)
    fhat = d.forward(g[d.real_slice].astype(dtype))
    ref = np.fft.rfftn(g) / g.size
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.abs(fhat - ref[d.spectral_slice]).max() <= tol * np.abs(ref).max()
    back = d.backward(fhat)
    assert np.abs(back - g[d.real_slice]).max() <= 10 * tol * np.abs(g).max()
    # inputs are preserved, also for arrays laid out as FFTW's own (transformed in place)
    f = d.new_scalar()
    f[...] = g[d.real_slice]
    f_copy, fhat_copy = f.copy(), fhat.copy()
    d.forward(f, fhat)
    np.testing.assert_array_equal(f, f_copy)
    d.backward(fhat, d.new_scalar())
    np.testing.assert_array_equal(fhat, fhat_copy)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_scatter_inner_norm(shape, dtype):
    d = Decomposition(shape, dtype=dtype)
    rng = np.random.default_rng(2)
    g = rng.standard_normal((3,) + shape).astype(dtype)
    h = rng.standard_normal((3,) + shape).astype(dtype)
    v = d.scatter(g if d.rank == 0 else None)
    w = d.scatter(h if d.rank == 0 else None)
    np.testing.assert_array_equal(v, g[(slice(None),) + d.real_slice])
    back = d.gather(v)
    if d.rank == 0:
        np.testing.assert_array_equal(back, g)
    else:
        assert back is None
    ref = float(np.dot(g.ravel().astype(float), h.ravel().astype(float)))
    assert abs(d.inner(v, w) - ref) <= 1e-12 * np.abs(g).sum() * np.abs(h).max()
    assert d.norm(v) == pytest.approx(np.linalg.norm(g.astype(float)), rel=1e-12)
    ghat = np.fft.rfftn(g[0])
    local_hat = d.scatter(ghat if d.rank == 0 else None, spectral=True)
    np.testing.assert_array_equal(local_hat, ghat[d.spectral_slice])
    full = d.gather(local_hat, spectral=True)
    if d.rank == 0:
        np.testing.assert_array_equal(full, ghat)


def test_allocation_shapes_and_dtypes(dtype):
    d = Decomposition((12, 10, 8), dtype=dtype)
    assert d.new_scalar().shape == d.local_shape and d.new_scalar().dtype == dtype
    assert d.new_vector().shape == (3,) + d.local_shape
    assert d.new_scalar(spectral=True).dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    assert d.new_vector(spectral=True).shape == (3,) + d.local_spectral_shape


def test_local_coordinates():
    d = Decomposition((16, 12, 10))
    x = d.local_coordinates()
    for a, s in enumerate(d.real_slice):
        np.testing.assert_allclose(x[a].ravel(), 2 * np.pi * np.arange(s.start, s.stop) / d.shape[a])


@pytest.mark.parametrize("shape, match", [
    ((16, 16), "3 grid sizes"), ((16, 16, 16, 2), "3 grid sizes"), ((16, 1, 16), "integers >= 2"),
    ((16.0, 16, 16), "integers >= 2"), (16, "3 grid sizes")])
def test_bad_shapes_name_the_fix(shape, match):
    with pytest.raises(ValueError, match=match):
        Decomposition(shape)


@pytest.mark.parametrize("dt", [np.int32, np.complex128, np.float16, "nonsense"])
def test_bad_dtype_names_the_fix(dt):
    with pytest.raises(ValueError, match="float32 or numpy.float64"):
        Decomposition((8, 8, 8), dtype=dt)


def test_bad_layout_and_proc_grid():
    with pytest.raises(ValueError, match="layout"):
        Decomposition((8, 8, 8), layout="cubes")
    with pytest.raises(ValueError, match="product is the number of ranks"):
        Decomposition((8, 8, 8), proc_grid=(COMM.size + 1, 1))
    with pytest.raises(ValueError, match="product is the number of ranks"):
        Decomposition((8, 8, 8), layout="slab", proc_grid=(COMM.size, 1))


@pytest.mark.parametrize("shape, p, layout, grid, expected", [
    ((16, 16, 16), 4, "auto", None, (4, 1)),
    ((16, 16, 16), 4, "pencil", None, (2, 2)),
    ((2, 2, 64), 4, "auto", None, (2, 2)),
    ((16, 16, 16), 6, "pencil", (3, 2), (3, 2)),
    ((3, 8, 8), 4, "slab", None, "axis 0 has 3 points for 4 blocks"),
    ((8, 8, 4), 4, "slab", None, "axis 2 has 3 spectral points for 4 blocks"),
    ((8, 8, 4), 4, "pencil", (1, 4), "axis 2 has 3 spectral points for 4 blocks"),
    ((8, 3, 8), 4, "pencil", (1, 4), "axis 1 has 3 points for 4 blocks"),
    ((16, 2, 16), 6, "pencil", (2, 3), "axis 1 has 2 points for 3 blocks"),
    ((16, 16, 4), 4, "auto", None, (2, 2)),
    ((2, 2, 2), 16, "auto", None, "use fewer ranks"),
])
def test_process_grid_choice(shape, p, layout, grid, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            choose_proc_grid(shape, p, layout, grid)
    else:
        assert choose_proc_grid(shape, p, layout, grid) == expected


def test_too_many_ranks_is_refused_on_every_rank():
    if COMM.size < 3:
        # no 3-D grid of sizes >= 2 has fewer points than 2 blocks; the rule is tested above
        assert choose_proc_grid((2, 2, 3), COMM.size, "auto", None) in ((1, 1), (2, 1))
        return
    with pytest.raises(ValueError, match="use fewer ranks"):
        Decomposition((COMM.size - 1, 16, 16), layout="slab")


def test_a_grid_too_thin_for_the_ranks_is_a_clear_error_on_every_rank():
    """A last axis of 2 points breaks mpi4py-fft's transposes on several ranks (an assertion,
    or a hang): refused alike on every rank, before any collective."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for shape in ((8, 8, 2), (2, 8, 2)):
        if comm.size == 1:
            d = Decomposition(shape)
            f = np.arange(float(np.prod(shape))).reshape(shape)
            np.testing.assert_allclose(d.backward(d.forward(f)), f)
        else:
            with pytest.raises(ValueError, match="last axis has 2 points"):
                Decomposition(shape)


_WISDOM_CHILD = """
import hashlib, numpy as np
from claire_py.kernels import Decomposition
from claire_py.kernels.decomposition import _FFTWWisdom
imported = _FFTWWisdom().imported.get("D", False)
d = Decomposition((32, 30, 28), dtype=np.float64, threads=1)
fhat = d.forward(np.random.default_rng(0).standard_normal((32, 30, 28)))
fhat *= 1j
print(imported, hashlib.md5(d.backward(fhat).tobytes()).hexdigest())
"""


def test_fftw_wisdom_is_imported_by_the_next_process(tmp_path):
    """A measured plan is timing-dependent and two plans round differently: the wisdom a run
    saves must be what the next process plans from, or the same inputs give different results
    in two runs (and a resumed run differs from an uninterrupted one). FFTW only imports it
    after its threaded solvers are registered (at the first plan)."""
    import subprocess
    import sys

    from claire_py._testing import clean_subprocess_env

    if COMM.rank == 0:
        env = dict(clean_subprocess_env(), CLAIRE_PY_CACHE=str(tmp_path))
        runs = [subprocess.run([sys.executable, "-c", _WISDOM_CHILD], env=env, capture_output=True, text=True,
                               check=True).stdout.split() for _ in range(3)]
        assert [r[0] for r in runs] == ["False", "True", "True"], runs  # nothing to import in the first run
        assert len({r[1] for r in runs}) == 1, runs
    COMM.Barrier()


@pytest.mark.parametrize("kw", _layouts(), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_boxes_move_a_field_between_file_slabs_and_blocks_and_back(shape, kw):
    """Each rank holds the planes k0 <= k < k1 (a file slab, uneven, some ranks maybe empty);
    blocks_from_boxes gives every rank its block, boxes_from_blocks any box back (here: the
    slab, and an overlapping box reaching across several ranks' blocks)."""
    d = Decomposition(shape, **kw)
    rng = np.random.default_rng(5)
    field = rng.standard_normal((2,) + shape)
    edges = [0] + sorted(rng.integers(0, shape[2] + 1, COMM.size - 1).tolist()) + [shape[2]]
    k0, k1 = edges[COMM.rank], edges[COMM.rank + 1]
    box = ((0, shape[0]), (0, shape[1]), (k0, k1))
    local = d.blocks_from_boxes(np.ascontiguousarray(field[..., k0:k1]), box)
    np.testing.assert_array_equal(local, field[(slice(None),) + d.real_slice])
    np.testing.assert_array_equal(d.boxes_from_blocks(local, box), field[..., k0:k1])
    wide = ((1, shape[0] - 1), (COMM.rank % 2, shape[1]), (0, shape[2] // 2 + 1))
    np.testing.assert_array_equal(d.boxes_from_blocks(local, wide), field[(slice(None),) + tuple(slice(*b) for b in wide)])
    # a frame no rank holds takes the fill value
    inner = ((1, shape[0]), (0, shape[1]), (k0, k1))
    part = d.blocks_from_boxes(np.ascontiguousarray(field[:, 1:, :, k0:k1]), inner, fill=-7.0)
    expected = field.copy()
    expected[:, 0] = -7.0
    np.testing.assert_array_equal(part, expected[(slice(None),) + d.real_slice])
    d.free()
    d.free()  # a second call does nothing


def test_freed_decompositions_return_their_communicators():
    """MPICH has ~2000 communicators per process: 3000 decompositions made and freed fit."""
    for _ in range(3000 // COMM.size):
        with Decomposition((8, 8, 8)) as d:
            assert d.comm.Get_size() == COMM.size
