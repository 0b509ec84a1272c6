"""Reliability (issue 8): hostile NIfTI input, no MPI hangs, outputs never half-written,
resource guards. Figures from these tests are recorded in benchmarks/RELIABILITY.md.

The fuzz tests run serially and under ``mpiexec -n P``: rank 0 drives hypothesis, writes each
hostile file and broadcasts it; every rank then reads it (or runs ``claire smooth`` /
``claire register`` on it) collectively, and all ranks must agree. The tests that start their
own ``mpiexec`` or Python jobs run in the serial pass only (a nested ``mpiexec`` inside an
``mpiexec`` rank is not allowed).
"""

import contextlib
import gzip
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from claire_py._testing import clean_subprocess_env
from claire_py.cli import main
from claire_py.errors import UserInputError
from claire_py.io import MAX_ABS_VALUE, read_image
from claire_py.kernels import reference

COMM = MPI.COMM_WORLD
SERIAL_ONLY = pytest.mark.skipif(
    COMM.size > 1, reason="starts its own mpiexec / Python jobs: a nested mpiexec inside an mpiexec rank is not "
                          "allowed; runs in the serial pass")
VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---------------------------------------------------------------------------------------------
# 1. Hostile NIfTI files: every case is a one-line UserInputError (exit 2) or a correct read
# ---------------------------------------------------------------------------------------------

#: NIfTI datatype codes claire_py reads, and their numpy types (the test's own table).
DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
#: Codes that are not real scalars (binary, complex, RGB, float128, undefined).
OTHER_CODES = [0, 1, 3, 32, 128, 255, 1536, 1792, 2048, 2304, 9999]
AFFINE = np.array([[1.5, 0.0, 0.0, -10.0], [0.0, 2.0, 0.0, 5.0], [0.0, 0.0, 2.5, 0.0], [0, 0, 0, 1.0]])
SPECIAL = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "big": 1e25}
HEADER_BYTES = 348

# header mutations: name -> values (applied to a valid header before the file is assembled)
MUTATIONS = {
    "dim0": st.sampled_from([-1, 0, 1, 2, 4, 5, 7, 8, 300]),
    "dim": st.tuples(st.integers(1, 7), st.sampled_from([-5, -1, 0, 1, 2, 3, 1000, 32767])),
    "pixdim": st.tuples(st.integers(0, 7), st.sampled_from([0.0, -1.0, -2.5, np.nan, np.inf, -np.inf, 1e-30, 1e30])),
    "qform_code": st.sampled_from([0, 1, 2, 3, 4, 5, -1, 255]),
    "sform_code": st.sampled_from([0, 1, 2, 3, 4, 5, -1, 255]),
    "srow": st.tuples(st.sampled_from(["srow_x", "srow_y", "srow_z"]), st.integers(0, 3),
                      st.sampled_from([0.0, np.nan, np.inf, 1e30, -1.0, 1e-30])),
    "sform_zero": st.just(True),
    "quatern": st.tuples(st.sampled_from(["quatern_b", "quatern_c", "quatern_d", "qoffset_x"]),
                         st.sampled_from([np.nan, np.inf, 2.0, -1.0, 0.5, 1e30])),
    "datatype": st.sampled_from(sorted(DTYPES) + OTHER_CODES),
    "bitpix": st.sampled_from([0, 8, 13, 64, -8]),
    "scaling": st.tuples(st.sampled_from([0.0, np.nan, 1.0, -2.0, 0.5, 1e-30, 1e30, np.inf, -np.inf]),
                         st.sampled_from([0.0, np.nan, np.inf, 5.0, -1e6])),
    "intent": st.sampled_from([0, 2, 1002, 1007, 1011, 2003, 9999, -5, 32767]),
    "vox_offset": st.sampled_from([0.0, 100.0, 348.0, 351.0, 353.0, 360.0, 368.0, 1e6, 1e20, -352.0, np.nan, np.inf]),
    "magic": st.sampled_from([b"ni1", b"n+2", b"xxx", b""]),
    "sizeof_hdr": st.sampled_from([0, 347, 540, 1000, -348]),
}
# damage to the file itself, after compression for .nii.gz
FILE_DAMAGE = {
    "truncate": st.floats(0.0, 0.999),
    "flip": st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)),
    "append": st.sampled_from([b"\0" * 7, b"garbage!", b"\x1f", b"\x1f\x8b\x08\0" + b"\0" * 12]),
    "extension": st.sampled_from([16, 32, 48]),  # garbage extension bytes before the data
}


@st.composite
def nifti_cases(draw, min_axis=1):
    """A NIfTI file's bytes (``.nii`` or ``.nii.gz``) written from a valid image, then damaged."""
    ndim = draw(st.sampled_from([3, 3, 3, 3, 3, 2, 4, 5]))
    shape = [draw(st.integers(min_axis, 7)) for _ in range(min(ndim, 3))]
    shape += [draw(st.sampled_from([1, 1, 3])) for _ in range(ndim - 3)]
    code = draw(st.sampled_from(sorted(DTYPES)))
    case = {
        "shape": tuple(shape), "code": code, "endian": draw(st.sampled_from("<>")),
        "gz": draw(st.booleans()), "seed": draw(st.integers(0, 2 ** 32 - 1)),
        "special": draw(st.sampled_from([None] * 6 + sorted(SPECIAL))) if DTYPES[code][0] == "f" else None,
        "scale": draw(st.sampled_from([1.0, 1e3, 1e-30, 1e30])),
    }
    names = draw(st.sets(st.sampled_from(sorted(MUTATIONS)), max_size=3))
    case["mutations"] = {name: draw(MUTATIONS[name]) for name in sorted(names)}
    names = draw(st.sets(st.sampled_from(sorted(FILE_DAMAGE)), max_size=1))
    case["damage"] = {name: draw(FILE_DAMAGE[name]) for name in sorted(names)}
    return case


def _values(case):
    rng = np.random.default_rng(case["seed"])
    dtype = np.dtype(DTYPES[case["code"]])
    if dtype.kind == "f":
        values = (rng.standard_normal(case["shape"]) * case["scale"]).astype(dtype)
        if case["special"] is not None:
            values.flat[rng.integers(values.size)] = SPECIAL[case["special"]]
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=case["shape"], dtype=dtype, endpoint=True)
    return values


def build_file(case):
    """``(file bytes, the valid image's values)`` of ``case``."""
    values = _values(case)
    hdr = nib.Nifti1Header(endianness=case["endian"])
    hdr.set_data_shape(values.shape)
    hdr.set_data_dtype(values.dtype)
    hdr.set_qform(AFFINE, code=1)
    hdr.set_sform(AFFINE, code=1)
    m, damage = case["mutations"], case["damage"]
    extension = bytes(np.random.default_rng(case["seed"]).integers(0, 256, damage.get("extension", 0), np.uint8))
    hdr["vox_offset"] = 352 + len(extension)
    if "dim0" in m or "dim" in m:
        dims = hdr["dim"].copy()
        if "dim0" in m:
            dims[0] = m["dim0"]
        if "dim" in m:
            dims[m["dim"][0]] = m["dim"][1]
        hdr["dim"] = dims
    if "pixdim" in m:
        pixdim = hdr["pixdim"].copy()
        pixdim[m["pixdim"][0]] = m["pixdim"][1]
        hdr["pixdim"] = pixdim
    for name in ("qform_code", "sform_code", "datatype", "bitpix", "vox_offset", "magic", "sizeof_hdr"):
        if name in m:
            hdr[name] = m[name]
    if "intent" in m:
        hdr["intent_code"] = m["intent"]
    if "srow" in m:
        row = hdr[m["srow"][0]].copy()
        row[m["srow"][1]] = m["srow"][2]
        hdr[m["srow"][0]] = row
    if "sform_zero" in m:
        for name in ("srow_x", "srow_y", "srow_z"):
            hdr[name] = np.zeros(4)
    if "quatern" in m:
        hdr[m["quatern"][0]] = m["quatern"][1]
    if "scaling" in m:
        hdr["scl_slope"], hdr["scl_inter"] = m["scaling"]
    flag = b"\1\0\0\0" if extension else b"\0\0\0\0"
    content = hdr.binaryblock + flag + extension + values.astype(values.dtype.newbyteorder(case["endian"])).tobytes("F")
    blob = gzip.compress(content, mtime=0) if case["gz"] else content
    if "truncate" in damage:
        blob = blob[:int(damage["truncate"] * len(blob))]
    if "flip" in damage and blob:
        where, xor = damage["flip"]
        blob = bytearray(blob)
        blob[int(where * len(blob))] ^= xor
        blob = bytes(blob)
    if "append" in damage:
        blob = blob + damage["append"]
    return blob, values


class _QUIET:
    @staticmethod
    def log(level, message):
        pass


def expected_read(blob, gz):
    """What reading ``blob`` must give, worked out from its bytes: ``("error", reason)``,
    ``("ok", data, affine)`` or ``("either", data, affine)`` (an error, or exactly that)."""
    if gz:
        try:
            content = gzip.decompress(blob)
        except Exception as exc:  # CRC, truncation, bad member: the file is damaged
            return ("error", f"gzip: {type(exc).__name__}")
    else:
        content = blob
    if len(content) < HEADER_BYTES:
        return ("error", "short")
    endian = None
    for e in "<>":
        if int(np.frombuffer(content[:4], e + "i4")[0]) == 348:
            endian = e
    if endian is None:
        return ("error", "sizeof_hdr")
    h = np.frombuffer(content[:HEADER_BYTES], nib.nifti1.header_dtype.newbyteorder(endian))[0]
    if bytes(h["magic"]).rstrip(b"\0") not in (b"n+1", b"ni1"):
        return ("error", "magic")
    dims = [int(d) for d in h["dim"]]
    if not 1 <= dims[0] <= 7:
        return ("error", "dim0")
    shape = tuple(dims[1:dims[0] + 1])
    if any(n <= 0 for n in shape):
        return ("error", "dims")
    if int(h["datatype"]) not in DTYPES:
        return ("error", "datatype")
    dtype = np.dtype(DTYPES[int(h["datatype"])]).newbyteorder(endian)
    offset = float(h["vox_offset"])
    if not np.isfinite(offset) or offset < 352:
        return ("error", "vox_offset")
    count = int(np.prod(shape))
    if int(offset) + count * dtype.itemsize > len(content):
        return ("error", "size")
    data = np.frombuffer(content, dtype, count, int(offset)).reshape(shape, order="F")
    slope, inter = float(h["scl_slope"]), float(h["scl_inter"])
    if np.isinf(slope):
        return ("error", "scl_slope")
    if slope != 0 and not np.isnan(slope):
        if not np.isfinite(inter):
            return ("error", "scl_inter")
        with np.errstate(over="ignore", invalid="ignore"):
            data = data.astype(np.float64) * slope + inter
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            return ("error", "non-finite voxels")
        if np.abs(data).max() > MAX_ABS_VALUE:
            return ("error", "huge voxels")
    # the affine: nibabel's reading of the (checked, fixed) header, then finite and regular
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(content), check=False)
        hdr.check_fix(logger=_QUIET, error_level=40)
        affine = hdr.get_best_affine()
    except Exception:
        return ("error", "header check")
    if not np.all(np.isfinite(affine)):
        return ("error", "affine not finite")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(norms > 0):
        return ("error", "affine singular")
    cond = np.linalg.cond(affine[:3, :3] / norms)
    if cond > 1e12:
        return ("error", "affine singular")
    if data.ndim != 3:  # (n1, n2, n3, C) images are channels for claire register
        return ("error", "ndim", np.asarray(data), affine)
    ambiguous = cond > 1e6 or content[HEADER_BYTES] != 0  # nearly singular, or garbage extensions
    return ("either" if ambiguous else "ok", np.asarray(data), affine)


def _category(message):
    """An error message without path and numbers, for counting."""
    text = re.sub(r"\S*\.nii(\.gz)?:?", "", message)
    cause = re.search(r"cannot be read as NIfTI \((\w+)", text)  # the exception type behind it
    text = re.sub(r"\(.*", "", text) + (f" ({cause.group(1)})" if cause else "")
    text = re.sub(r"[<>|]?\b(u?int|float|[uif])\d+\b", "TYPE", text)
    return " ".join(re.sub(r"[-+]?\d[\d.e+-]*", "N", text).split()[:7])


SERIAL = itertools.count()  # unique file names across hypothesis' examples and shrinks


def _collective(drive, serve):
    """Run ``drive(step)`` on rank 0 (hypothesis) while the other ranks ``serve`` the jobs
    that ``step(job)`` broadcasts; every rank runs each job, rank 0 gets all ranks' results."""
    def step(job):
        COMM.bcast(job)
        return COMM.gather(serve(job))

    if COMM.rank == 0:
        try:
            drive(step)
        finally:
            COMM.bcast(None)
    else:
        while (job := COMM.bcast(None)) is not None:
            COMM.gather(serve(job))


def _read_outcome(path):
    try:
        img = read_image(path, COMM)
    except UserInputError as exc:
        return ("error", str(exc))
    except Exception as exc:  # a crash: reported to rank 0, which fails the test
        return ("crash", f"{type(exc).__name__}: {exc}")
    return ("ok", img.data, img.affine, img.shape)


def _check_read(expect, outcomes, values, case):
    mine, others = outcomes[0], outcomes[1:]
    assert mine[0] != "crash", mine
    for other in others:  # every rank agrees: the same error, or the same geometry
        assert other[0] == mine[0], (mine[0], other)
        if mine[0] == "error":
            assert other[1] == mine[1]
        else:
            assert other[1] is None and other[3] == mine[3]
            np.testing.assert_array_equal(other[2], mine[2])
    if mine[0] == "error":
        assert "\n" not in mine[1] and mine[1].strip(), mine
        assert expect[0] in ("error", "either"), f"refused a readable file: {mine[1]} ({case})"
        return "error: " + _category(mine[1])
    assert expect[0] in ("ok", "either"), f"read a broken file ({expect[1]}): {case}"
    _, data, affine, shape = mine
    want = expect[1]
    assert data.shape == want.shape == shape
    assert data.dtype.kind in "uif" and data.dtype.isnative and np.all(np.isfinite(data))
    if data.dtype == want.dtype:
        np.testing.assert_array_equal(data, want)
    else:  # scaled: nibabel may scale in float32
        peak = float(np.abs(want).max()) if want.size else 0.0
        np.testing.assert_allclose(np.asarray(data, np.float64), want, rtol=1e-6, atol=1e-6 * peak)
    np.testing.assert_allclose(affine, expect[2], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0
    if not case["mutations"] and not case["damage"] and case["special"] is None:
        np.testing.assert_array_equal(data, values.reshape(data.shape))  # the oracle reads a valid file right
        np.testing.assert_allclose(affine, AFFINE, rtol=1e-6)
    return "ok"


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def _write_case(directory, case, index):
    blob, values = build_file(case)
    path = os.path.join(directory, f"case{index}.nii" + (".gz" if case["gz"] else ""))
    with open(path, "wb") as fh:
        fh.write(blob)
    return path, values, expected_read(blob, case["gz"])


def test_fuzz_hostile_nifti_reads(module_shared_tmp):
    """read_image on hostile files: a one-line UserInputError on every rank alike, or exactly
    the voxels and affine the file's bytes describe."""
    counts, t0 = Counter(), time.perf_counter()

    def drive(step):
        @FUZZ
        @given(nifti_cases())
        def run(case):
            path, values, expect = _write_case(module_shared_tmp, case, next(SERIAL))
            outcome = _check_read(expect, step(("read", path)), values, case)
            counts[outcome] += 1
            os.unlink(path)

        run()

    _collective(drive, lambda job: _read_outcome(job[1]))
    if COMM.rank == 0:
        total = sum(counts.values())
        print(f"\nfuzz read_image: {total} cases in {time.perf_counter() - t0:.1f} s on {COMM.size} rank(s)")
        for outcome, n in counts.most_common():
            print(f"  {n:5d}  {outcome}")
        assert total >= 900 and counts["ok"] >= 100


@pytest.mark.parametrize("variant", ["nifti2", "nifti2-gz", "multi-member-gz", "big-endian-scaled", "vox-offset-0",
                                     "bit-flip-gz"])
def test_particular_files(shared_tmp, variant):
    """Valid files the fuzz does not write (NIfTI-2, several gzip members, big-endian scaled
    int16) are read exactly; damaged ones are refused: vox_offset 0 (nibabel reads the header
    bytes as voxels) and a flipped bit inside a .nii.gz's deflate stream (the gzip CRC)."""
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    path, want = os.path.join(shared_tmp, f"{variant}.nii" + (".gz" if "gz" in variant else "")), data
    if COMM.rank == 0:
        klass = nib.Nifti2Image if variant.startswith("nifti2") else nib.Nifti1Image
        img = klass(data, AFFINE)
        if variant == "big-endian-scaled":
            img = klass(data, AFFINE, header=nib.Nifti1Header(endianness=">"))
            img.header.set_slope_inter(0.5, -3.0)
        content = img.to_bytes()
        if variant == "vox-offset-0":
            hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(content), check=False)
            hdr["vox_offset"] = 0
            content = hdr.binaryblock + content[HEADER_BYTES:]
        if variant == "multi-member-gz":
            blob = gzip.compress(content[:500], mtime=0) + gzip.compress(content[500:], mtime=0)
        elif variant.endswith("gz"):
            blob = gzip.compress(content, mtime=0)
        else:
            blob = content
        if variant == "bit-flip-gz":  # a flip gzip.decompress detects (CRC) but a partial read does not
            for where in range(len(blob) - 9, 20, -1):
                damaged = bytearray(blob)
                damaged[where] ^= 0x01
                try:
                    raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(damaged[10:]))
                except zlib.error:
                    continue
                if len(raw) >= len(content) and raw[:len(content)] != content:
                    blob = bytes(damaged)
                    break
            else:
                pytest.fail("no silent bit flip found")
        with open(path, "wb") as fh:
            fh.write(blob)
    COMM.Barrier()
    if variant == "big-endian-scaled":
        want = data * 0.5 - 3.0
    if variant in ("vox-offset-0", "bit-flip-gz"):
        with pytest.raises(UserInputError, match="vox_offset|cannot be read"):
            read_image(path, COMM)
        return
    img = read_image(path, COMM)
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, AFFINE, rtol=1e-6)
    if COMM.rank == 0:
        np.testing.assert_array_equal(img.data, want)
        assert img.data.dtype.isnative


def _cli_outcome(job):
    _, command, path, out = job
    argv = (["smooth", path, "-o", out, "--sigma", "1", "--dtype", "float64"] if command == "smooth" else
            ["register", path, path, "-o", out, "--max-iter", "1", "--quiet", "--precision", "float64"])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except BaseException as exc:  # a crash: reported to rank 0, which fails the test
        return ("crash", f"{type(exc).__name__}: {exc}", err.getvalue())
    return (code, err.getvalue())


def test_fuzz_hostile_nifti_through_the_cli(module_shared_tmp):
    """``claire smooth`` and ``claire register`` on hostile files: exit 2 with one line and no
    output, or exit 0 with the output the file's voxels give."""
    counts, t0 = Counter(), time.perf_counter()
    # under MPI, grids with an axis of 2 crash the distributed FFT (a kernels limitation,
    # benchmarks/RELIABILITY.md): those cases run serially only
    min_axis = 2 if COMM.size == 1 else 3

    def drive(step):
        @settings(FUZZ, max_examples=100)
        @given(nifti_cases(min_axis=min_axis), st.sampled_from(["smooth", "register"]))
        def run(case, command):
            index = next(SERIAL)
            path, values, expect = _write_case(module_shared_tmp, case, index)
            channels = expect[0] == "error" and expect[1] == "ndim" and expect[2].ndim == 4
            if command == "register" and channels and expect[2].shape[3] <= 16:
                expect = ("either", expect[2], expect[3])  # channels of a multi-component registration
            if COMM.size > 1 and expect[0] != "error":
                assume(2 not in expect[1].shape)
            out = os.path.join(module_shared_tmp, f"out{index}" + (".nii.gz" if command == "smooth" else ""))
            results = step(("cli", command, path, out))
            (code, err), others = results[0][:2], results[1:]
            assert code != "crash", results[0]
            assert all(o[0] == code and not o[1] for o in others), results  # one status, one report
            lines = [re.sub(r"^\[\d+/\d+\] ", "", line) for line in err.strip().splitlines()]
            produced = os.path.join(out, "registration.json") if command == "register" else out
            errors = [line for line in lines if line.startswith("claire: error:")]
            if code == 2:
                # besides the error: header fixes nibabel made (an invalid sform_code dropped...)
                assert all(line.startswith(("claire: error:", "warning: ")) for line in lines), err
                assert len(errors) == 1, err
                # or a grid too small for the decomposition / interpolation, or a constant image
                small = re.search("constant|integers >= 2|grid planes", errors[0])
                assert expect[0] in ("error", "either") or small, (err, case)
                assert not os.path.exists(produced)
                counts[f"{command} exit 2: {_category(errors[0][len('claire: error: '):])}"] += 1
            else:
                assert code == 0 and expect[0] in ("ok", "either"), (code, err, expect[:2], case)
                want = np.asarray(expect[1], np.float64)
                peak = float(np.abs(want).max())
                if command == "smooth":
                    result = nib.load(out)
                    np.testing.assert_allclose(result.get_fdata(), reference.smooth(want, 1.0),
                                               rtol=1e-5, atol=1e-6 * peak)
                else:  # registering an image onto itself: v = 0, warped = moving
                    with open(produced) as fh:
                        assert json.load(fh)["complete"] is True
                    result = nib.load(os.path.join(out, "warped.nii.gz"))
                    np.testing.assert_allclose(result.get_fdata().reshape(want.shape), want, rtol=1e-5,
                                               atol=1e-5 * peak)
                np.testing.assert_allclose(result.affine, expect[2], rtol=1e-6, atol=1e-6)
                counts[f"{command} exit 0"] += 1

        run()

    _collective(drive, _cli_outcome)
    if COMM.rank == 0:
        total = sum(counts.values())
        print(f"\nfuzz claire smooth/register: {total} cases in {time.perf_counter() - t0:.1f} s "
              f"on {COMM.size} rank(s)")
        for outcome, n in counts.most_common():
            print(f"  {n:5d}  {outcome}")
        assert total >= 30


# ---------------------------------------------------------------------------------------------
# 2. No MPI hangs: an exception on one rank ends every rank, non-zero, error printed once
# ---------------------------------------------------------------------------------------------

def _pair(n):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = 200 * (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = 200 * (np.sin(x[0] - 0.3 * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed.astype(np.float32), moving.astype(np.float32)


def _write_pair(directory, n):
    fixed, moving = _pair(n)
    paths = os.path.join(directory, f"fixed{n}.nii.gz"), os.path.join(directory, f"moving{n}.nii.gz")
    for path, data in zip(paths, (fixed, moving)):
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return paths


# A driver like the `claire` console script (or `python -m claire_py`), with a fault injected:
#   solve: a ValueError (a "user error" type, the case that used to hang) raised on rank 1 only,
#          from the Gauss-Newton callback at iteration 1, while rank 0 waits in a collective;
#   write: an OSError (disk full) on rank 0 only, while writing the outputs after the solve;
#   none:  no fault (a bad input then fails on every rank alike).
# Every rank that returns from main() records its status in RCDIR/rc.RANK; the fault, its time
# in RCDIR/fault.
DRIVER = '''
import os, sys, time
from mpi4py import MPI
import claire_py.api, claire_py.cli, claire_py.outputs

rank = MPI.COMM_WORLD.Get_rank()
mode, rcdir, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
message = "injected" + " fault " + mode  # built here: a traceback's source line must not repeat it


def fault():
    with open(os.path.join(rcdir, "fault"), "w") as fh:
        fh.write(repr(time.time()))

if mode == "solve":
    register = claire_py.api.register

    def faulty(*args, **kwargs):
        def callback(info):
            if rank == 1 and info.iteration >= 1:
                fault()
                raise ValueError(message + " on rank 1")
        return register(*args, callback=callback, **kwargs)

    claire_py.api.register = faulty
elif mode == "write":
    def write_outputs(*args, **kwargs):
        fault()
        raise OSError(28, message + ": no space left on device")

    claire_py.outputs.write_outputs = write_outputs
status = claire_py.cli.main(argv)
with open(os.path.join(rcdir, f"rc.{rank}"), "w") as fh:
    fh.write(str(status))
sys.exit(status)
'''

# The Python API under `python -m mpi4py`: a callback raising on rank 1 only.
API_SCRIPT = '''
import os, sys, time
import numpy as np
from mpi4py import MPI
import claire_py

rank = MPI.COMM_WORLD.Get_rank()
n = 16
x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
moving = np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2
fixed = np.sin(x[0] - 0.3 * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2

def callback(info):
    if rank == 1 and info.iteration >= 1:
        open(os.path.join(sys.argv[1], "fault"), "w").write(repr(time.time()))
        raise RuntimeError("injected" + " fault api on rank 1")

cfg = claire_py.RegistrationConfig.from_dict({"newton": {"max_iterations": 4}, "regularization": {"beta": 1e-3}})
claire_py.register(fixed if rank == 0 else None, moving if rank == 0 else None, config=cfg, callback=callback)
open(os.path.join(sys.argv[1], f"rc.{rank}"), "w").write("0")
'''


def _mpiexec(*args):
    return [os.path.join(VENV_BIN, "mpiexec"), "-n", "2", sys.executable, *args]


def _start(argv, cwd):
    env = clean_subprocess_env()
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc, t0, limit=30.0):
    """``(exit status, output, seconds)``; the whole job is killed ``limit`` seconds after
    ``t0`` (monotonic)."""
    try:
        out, _ = proc.communicate(timeout=max(limit - (time.monotonic() - t0), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - t0
    return proc.returncode, out, time.monotonic() - t0


@SERIAL_ONLY
def test_an_exception_on_one_rank_ends_every_rank(tmp_path):
    """Each job runs on 2 ranks and must end within 30 s of its fault (of its start when the
    fault is a bad input) with a non-zero status on every rank and the error printed once.
    The quick jobs run together first, then the two where a rank fails alone (its partner
    spins in a collective until the job is aborted). A job still running 120 s after its start
    (startup included, on a loaded machine) counts as hung."""
    fixed, moving = _write_pair(tmp_path, 16)
    expected = {"write": "injected fault write: no space left", "none": "missing.nii.gz: no such file",
                "api": "injected fault api on rank 1", "solve": "injected fault solve on rank 1",
                "solve-mpi4py": "injected fault solve on rank 1"}

    def start(name):
        mode, launcher = name.split("-")[0], (["-m", "mpi4py"] if name.endswith("mpi4py") else [])
        workdir = tmp_path / name
        workdir.mkdir()
        if name == "api":
            (workdir / "script.py").write_text(API_SCRIPT)
            argv = _mpiexec("-m", "mpi4py", "script.py", str(workdir))
        else:
            (workdir / "driver.py").write_text(DRIVER)
            fixed_arg = fixed if mode != "none" else str(tmp_path / "missing.nii.gz")
            argv = _mpiexec(*launcher, "driver.py", mode, str(workdir), "register", fixed_arg, moving,
                            "-o", str(workdir / "out"), "--max-iter", "3", "--beta", "1e-3")
        return workdir, _start(argv, workdir), time.monotonic(), time.time()

    for wave in (["write", "none", "api"], ["solve", "solve-mpi4py"]):
        jobs = {name: start(name) for name in wave}
        for name, (workdir, proc, t0, started) in jobs.items():
            code, out, seconds = _finish(proc, t0, limit=120.0)
            assert code is not None, f"{name}: still running after 120 s (hung):\n{out}"
            fault = workdir / "fault"
            since = time.time() - (float(fault.read_text()) if fault.exists() else started)
            assert (name == "none") != fault.exists(), f"{name}: the fault was not injected:\n{out}"
            assert since < 30, f"{name}: ended {since:.1f} s after the fault"
            assert code != 0, f"{name}: exit status 0:\n{out}"
            assert out.count(expected[name]) == 1, f"{name}: the error is not printed exactly once:\n{out}"
            statuses = {p.name: p.read_text() for p in workdir.glob("rc.*")}
            assert "0" not in statuses.values(), f"{name}: a rank returned 0: {statuses}\n{out}"
            if name in ("write", "none"):  # the others finished or failed alike: a clean exit 2 everywhere
                assert statuses == {"rc.0": "2", "rc.1": "2"} and code == 2, (statuses, out)
                assert "Traceback" not in out and "Abort" not in out, out
            print(f"{name}: exit {code} {since:.1f} s after the fault ({seconds:.1f} s after the start), "
                  f"rank statuses {statuses or 'none (aborted)'}")


# ---------------------------------------------------------------------------------------------
# 3. Outputs are never half-written: SIGKILL while the outputs are written
# ---------------------------------------------------------------------------------------------

OUTPUT_FILES = {"warped.nii.gz", "velocity.nii.gz", "det_grad_y.nii.gz", "deformation_map.nii.gz",
                "displacement.nii.gz", "residual_before.nii.gz", "residual_after.nii.gz", "affine.mat",
                "transform.h5"}


def _check_outdir(outdir, n):
    """Every file under a final name is complete; registration.json is absent, or complete
    and describes the files beside it. Returns ``(final files, temporary files, complete)``."""
    names = sorted(os.listdir(outdir)) if os.path.isdir(outdir) else []
    finals = [f for f in names if not f.startswith(".")]
    temporary = [f for f in names if f.startswith(".")]
    assert all(".partial" in f or f.startswith(".claire-write-test-") for f in temporary), temporary
    meta = None
    for name in finals:
        path = os.path.join(outdir, name)
        if name == "registration.json":
            with open(path) as fh:
                meta = json.load(fh)  # complete JSON: written to a temporary name, then renamed
            continue
        assert name in OUTPUT_FILES, name
        if name == "affine.mat":  # the whole file: a truncated one raises
            from scipy.io import loadmat

            assert np.all(np.isfinite(loadmat(path)["AffineTransform_double_3_3"])), name
            continue
        if name == "transform.h5":
            import h5py

            with h5py.File(path, "r") as h5:
                field = h5["TransformGroup/2/TransformParameters"][...]
            assert field.size == 3 * n ** 3 and np.all(np.isfinite(field)), name
            continue
        data = nib.load(path).get_fdata()
        assert data.shape[:3] == (n, n, n) and np.all(np.isfinite(data)), name
    if meta is not None:
        assert meta["complete"] is True and set(meta["files"]) <= set(finals), (meta.get("files"), finals)
        det = nib.load(os.path.join(outdir, "det_grad_y.nii.gz")).get_fdata()
        # the record and the files come from the same run (not an old record over new files)
        assert np.isclose(det.min(), meta["det_grad_y"]["min"], rtol=1e-6)
        assert np.isclose(det.max(), meta["det_grad_y"]["max"], rtol=1e-6)
    return finals, temporary, meta is not None


def _register_until(argv, cwd, outdir, delay):
    """Run ``argv``; once its output writing starts (a temporary file appears, or the old
    registration.json goes away), wait ``delay`` seconds and SIGKILL it. Returns the seconds
    from the start of the writing to the new registration.json (None if killed first)."""
    proc = _start(argv, cwd)
    record = os.path.join(outdir, "registration.json")
    old = os.path.getmtime(record) if os.path.exists(record) else None
    left = set(os.listdir(outdir)) if os.path.isdir(outdir) else set()  # temporary files of killed runs
    started = finished = None
    while proc.poll() is None:
        names = set(os.listdir(outdir)) if os.path.isdir(outdir) else set()
        now = os.path.getmtime(record) if os.path.exists(record) else None
        if started is None and (any(".partial" in f for f in names - left) or (old is not None and now != old)):
            started = time.monotonic()
        if started is not None and finished is None and now is not None and now != old:
            finished = time.monotonic()
        if started is not None and time.monotonic() - started >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.0005)
    out, _ = proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, out
    return None if finished is None else finished - started


@SERIAL_ONLY
def test_outputs_survive_sigkill_during_writing(tmp_path):
    """Runs killed at several moments of their output writing, into a directory holding a
    complete registration (--overwrite) and into a fresh one."""
    n = 32
    fixed, moving = _write_pair(tmp_path, n)
    outdir = str(tmp_path / "out")
    base = [sys.executable, "-m", "claire_py", "register", fixed, moving, "-o", outdir, "--max-iter", "1",
            "--quiet"]
    window = _register_until(base + ["--beta", "1e-2"], tmp_path, outdir, delay=1e9)  # a complete run
    assert _check_outdir(outdir, n)[2] and window
    seen = Counter()
    for i, fraction in enumerate([0.0, 0.4, 0.8]):
        # replace the complete run with another (--overwrite, another beta), and kill it
        _register_until(base + ["--beta", "1e-3", "--overwrite"], tmp_path, outdir, delay=fraction * window)
        finals, temporary, complete = _check_outdir(outdir, n)
        seen[f"overwrite: {len(finals) - complete} images, {'complete' if complete else 'no'} record"] += 1
        # a fresh OUTDIR killed alike: a subset of complete files and no record, or everything
        fresh = str(tmp_path / f"fresh{i}")
        _register_until([*base[:7], fresh, *base[8:], "--beta", "1e-3"], tmp_path, fresh, delay=fraction * window)
        finals, temporary, complete = _check_outdir(fresh, n)
        seen[f"fresh: {len(finals) - complete} images, {'complete' if complete else 'no'} record"] += 1
    print(f"\nkilled 6 runs while writing their outputs ({window:.2f} s): {dict(seen)}")


# ---------------------------------------------------------------------------------------------
# 4. Resource guards, found before the solve starts
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_solve(monkeypatch):
    """claire register's solve replaced by a failure: a guard must refuse before it."""
    import claire_py.api

    def register(*args, **kwargs):
        raise AssertionError("the solve started")

    monkeypatch.setattr(claire_py.api, "register", register)


@pytest.fixture
def pair(shared_tmp):
    paths = None
    if COMM.rank == 0:
        paths = _write_pair(shared_tmp, 16)
    return COMM.bcast(paths)


def _refused(argv, capsys, message):
    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    if COMM.rank == 0:
        assert err.count("\n") == 1 and err.startswith("claire: error:") and message in err, err
    return time.perf_counter() - t0


def test_unwritable_outdir_is_refused_before_the_solve(shared_tmp, pair, capsys, no_solve):
    # /proc refuses new files even to root (os.access says it is writable)
    _refused(["register", *pair, "-o", "/proc/claire-out"], capsys, "/proc is not writable")
    blocker = os.path.join(shared_tmp, "a-file")
    if COMM.rank == 0:
        open(blocker, "w").close()
    COMM.Barrier()
    _refused(["register", *pair, "-o", os.path.join(blocker, "out")], capsys, "is not a directory")
    assert not os.path.exists("/proc/claire-out")


def test_full_disk_is_refused_before_the_solve(shared_tmp, pair, capsys, no_solve, monkeypatch):
    real = os.statvfs

    def full(path):
        s = real(path)
        return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, 0, 0, s.f_files, 0, 0, s.f_flag, s.f_namemax))

    monkeypatch.setattr(os, "statvfs", full)
    out = os.path.join(shared_tmp, "full")
    assert _refused(["register", *pair, "-o", out], capsys, "MiB free") < 5
    assert not os.path.exists(out)


def test_outdir_space_estimate_from_the_grid(tmp_path, monkeypatch):
    from claire_py.outputs import prepare_outdir

    real = os.statvfs

    def one_gib(path):
        s = real(path)
        blocks = (1 << 30) // s.f_frsize
        return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, blocks, blocks, s.f_files, 0, 0, s.f_flag,
                                  s.f_namemax))

    monkeypatch.setattr(os, "statvfs", one_gib)
    out = str(tmp_path / "space")  # this rank's own directory: the check is per process
    prepare_outdir(out, create=False, shape=(256, 256, 256))  # 256^3: 0.8 GiB of outputs
    with pytest.raises(UserInputError, match=r"1024\.0 MiB free .* need up to 6656\.0 MiB"):
        prepare_outdir(out, create=False, shape=(512, 512, 512))
    with pytest.raises(UserInputError, match="MiB free"):
        prepare_outdir(out, create=False, bytes_needed=2 << 30)
    assert not os.path.exists(out) and not os.listdir(tmp_path)  # the write probe left nothing


def test_headers_claiming_huge_grids_are_refused_before_allocating(shared_tmp):
    """A header may claim any size: refused from the file size, the deflate ratio or the
    node's memory before nibabel allocates a buffer of the claimed size."""
    import resource

    def available():
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))

    paths = None
    if COMM.rank == 0:
        paths = []
        # 1.5 GB claimed by a 1 kB .nii.gz, and by a 1 kB .nii
        for name, n in (("gz.nii.gz", 720), ("raw.nii", 720)):
            hdr = nib.Nifti1Header()
            hdr.set_data_shape((n, n, n))
            hdr.set_data_dtype(np.float32)
            hdr["vox_offset"] = 352
            blob = hdr.binaryblock + b"\0" * 4 + b"\0" * 1024
            path = os.path.join(shared_tmp, name)
            with open(path, "wb") as fh:
                fh.write(gzip.compress(blob) if name.endswith(".gz") else blob)
            paths.append((path, "cannot hold them" if name.endswith(".gz") else "but the file has"))
        # a sparse .nii as large as twice the node's available memory: the file holds the bytes
        n = int(round((2 * available() / 4) ** (1 / 3))) + 1
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((n, n, n))
        hdr.set_data_dtype(np.float32)
        hdr["vox_offset"] = 352
        path = os.path.join(shared_tmp, "sparse.nii")
        with open(path, "wb") as fh:
            fh.write(hdr.binaryblock + b"\0" * 4)
            fh.truncate(352 + 4 * n ** 3)
        paths.append((path, "GiB is available"))
    for path, message in COMM.bcast(paths):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with pytest.raises(UserInputError, match=message):
            read_image(path, COMM)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        assert time.perf_counter() - t0 < 5 and grown < 200e6, (path, grown)


# The memory guard of the registration itself (a grid whose predicted peak exceeds the node's
# memory is refused before allocating) is tested in tests/api/test_register.py:
# test_register_refuses_a_grid_too_large_for_memory_before_allocating.
