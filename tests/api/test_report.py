"""The visual report (issue 9): drawn on rank 0 from a finished registration's OUTDIR."""

import argparse
import contextlib
import io
import json
import os
import shutil
from html.parser import HTMLParser

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import RegistrationConfig, UserInputError
from claire_py import report as rp

COMM = MPI.COMM_WORLD
N = 24
INKED = {"slices.png": 0.2, "residuals.png": 0.3, "grid.png": 0.3}  # image mosaics (slices: >= 1 row of 3)
PANELS = {"slices.png", "residuals.png", "det_grad_y.png", "grid.png", "convergence.png", "workload.png"}


def _pair(n=N):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = 100 + 50 * (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    shift = 0.25 * np.sin(x[1])
    fixed = 100 + 50 * (np.sin(x[0] - shift) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


@pytest.fixture(scope="module")
def result():
    """One small real registration (collective), shared by the tests of this file."""
    fixed, moving = _pair()
    cfg = RegistrationConfig.from_dict({"regularization": {"beta": 1e-3}, "precision": "float64",
                                        "newton": {"max_iterations": 3}})
    root = COMM.rank == 0
    return claire_py.register(fixed if root else None, moving if root else None, config=cfg)


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _write_json(path, payload):
    with open(path, "w") as fh:
        json.dump(payload, fh)


def _save(result, outdir, inputs=None):
    """``result.save`` on rank 0, then a barrier."""
    if COMM.rank == 0:
        result.save(outdir, inputs=inputs)
    COMM.Barrier()


class _Page(HTMLParser):
    """Every tag's attributes, and each ``<img>`` with the text of its ``<figcaption>``."""

    def __init__(self):
        super().__init__()
        self.attrs, self.images, self.captions, self._caption = [], [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attrs.append((tag, attrs))
        if tag == "img":
            self.images.append(attrs)
        elif tag == "figcaption":
            self._caption = self.images[-1]["src"]
            self.captions[self._caption] = ""

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._caption = None

    def handle_data(self, data):
        if self._caption:
            self.captions[self._caption] += data


def _parse(path):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    page = _Page()
    page.feed(text)
    page.close()
    return text, page


def _check_page(outdir, text, page):
    """Every referenced file is a relative name inside OUTDIR, exists, and every image is a
    valid PNG of its declared size (= FIGURE_SIZES * DPI) that is not blank."""
    assert "http:" not in text and "https:" not in text and "url(" not in text
    assert not any(tag in ("script", "link", "iframe", "object") for tag, _ in page.attrs)
    outdir_real = os.path.realpath(outdir)
    for tag, attrs in page.attrs:
        for key in ("src", "href"):
            if key in attrs:
                ref = attrs[key]
                assert not os.path.isabs(ref) and ".." not in ref.split("/") and ":" not in ref, (tag, ref)
                assert os.path.dirname(os.path.realpath(os.path.join(outdir, ref))) == outdir_real, ref
    sizes = {}
    for img in page.images:
        path = os.path.join(outdir, img["src"])
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", img["src"]
        pixels = matplotlib.image.imread(path)
        width, height = (round(x * rp.DPI) for x in rp.FIGURE_SIZES[img["src"]])
        assert pixels.shape[:2] == (height, width) == (int(img["height"]), int(img["width"])), img["src"]
        rgb = pixels[..., :3]
        assert rgb.std() > 0, f"{img['src']} is blank"
        inked = np.mean(np.any(rgb < 0.9, axis=-1))  # not (near) white; empty axes with a title: < 0.01
        assert inked > INKED.get(img["src"], 0.02), (img["src"], inked)
        sizes[img["src"]] = pixels.shape
    return sizes


def test_report_of_a_small_registration(result, shared_tmp):
    out = os.path.join(shared_tmp, "out")
    _save(result, out)
    if COMM.rank == 0:
        path = rp.write_report(out, fixed=result.fixed, moving=result.moving)
        assert path == os.path.join(out, "report.html")
        text, page = _parse(path)
        assert {img["src"] for img in page.images} == PANELS
        sizes = _check_page(out, text, page)
        assert sizes["slices.png"][0] > 500
        assert "unavailable" not in text, "FIXED and MOVING were given"
        assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary file left behind"
        det = result.det_grad_y
        caption = page.captions["det_grad_y.png"]
        assert f"min {det.min():.3f}, max {det.max():.3f}" in caption
        assert "below the bound 0.25" in caption
        history = _read_json(os.path.join(out, "registration.json"))["history"]
        pcg = sum(h["krylov_iterations"] for h in history)
        assert f"{pcg} PCG iterations" in page.captions["convergence.png"] and pcg > 0
        assert "<th>claire_py</th>" in text and '"det_bound": 0.25' in text  # versions and resolved config
    COMM.Barrier()


def test_known_det_field_dice_levels_and_missing_inputs(result, shared_tmp):
    """A det(∇y) with known min/max/shares, a Dice entry, a β continuation history, and no
    FIXED/MOVING anywhere: the page draws what it can and says what it left out."""
    out = os.path.join(shared_tmp, "known")
    _save(result, out)
    if COMM.rank == 0:
        affine = nib.load(os.path.join(out, "det_grad_y.nii.gz")).affine
        det = np.ones((N, N, N), np.float32)
        det[0] = 0.2              # 576 voxels below the bound 0.25
        det[1, 2, 3] = 0.125      # the minimum, also below
        det[4, 5, 6] = 6.5        # the maximum, the only one above 1/0.25 = 4
        nib.save(nib.Nifti1Image(det, affine), os.path.join(out, "det_grad_y.nii.gz"))
        meta_path = os.path.join(out, "registration.json")
        meta = _read_json(meta_path)
        meta["inputs"] = {}
        meta["dice"] = {"labels": [1, 2, 3], "before": [0.5, 0.6, 0.7], "after": [0.8, 0.85, 0.9]}
        first = dict(meta["history"][0], beta=0.1)
        meta["history"] = [first, dict(first, iteration=1)] + meta["history"]  # a presolve at beta = 0.1
        _write_json(meta_path, meta)

        text, page = _parse(rp.write_report(out))
        caption = " ".join(page.captions["det_grad_y.png"].split())
        assert "min 0.125, max 6.500" in caption
        assert f"{100 * 577 / N**3:.2f} % of voxels below the bound 0.25" in caption
        assert f"{100 / N**3:.2f} % above" in caption
        assert "0.00 % ≤ 0" in caption
        assert {img["src"] for img in page.images} == PANELS | {"dice.png"}
        _check_page(out, text, page)
        assert "mean 0.600 → 0.850" in page.captions["dice.png"]
        assert "2 levels, β = 0.1, 0.001" in page.captions["convergence.png"]
        assert "FIXED image unavailable" in text and "MOVING image unavailable" in text
        assert "pulled back onto the warped image (FIXED unavailable)" in page.captions["grid.png"]
    COMM.Barrier()


def _report_parser():
    parser = argparse.ArgumentParser(prog="claire")
    rp.add_report_command(parser.add_subparsers(dest="command", required=True))
    return parser


def _claire(argv):
    """``claire ARGV`` through claire_py.cli.main once cli.py wires the report command, else
    through a parser holding only it (the same ``_cmd_report``)."""
    from claire_py import cli

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli._build_parser().parse_args(["report", "OUTDIR"])
        wired = True
    except SystemExit:
        wired = False
    if wired:
        return cli.main(argv)
    args = _report_parser().parse_args(argv)
    return args.run(args)


def test_claire_report_reproduces_the_same_files(result, shared_tmp, capsys):
    first, second = os.path.join(shared_tmp, "first"), os.path.join(shared_tmp, "second")
    inputs = {"fixed": os.path.join(shared_tmp, "fixed.nii.gz"), "moving": os.path.join(shared_tmp, "moving.nii.gz")}
    if COMM.rank == 0:
        for role in ("fixed", "moving"):
            nib.save(nib.Nifti1Image(getattr(result, role), np.eye(4)), inputs[role])
    _save(result, first, inputs=inputs)
    if COMM.rank == 0:
        rp.write_report(first, fixed=result.fixed, moving=result.moving)
        shutil.copytree(first, second)
        for name in os.listdir(second):
            if name.endswith((".png", ".html")):
                os.unlink(os.path.join(second, name))
    COMM.Barrier()
    assert _claire(["report", second]) == 0
    COMM.Barrier()
    if COMM.rank == 0:
        assert f"wrote {os.path.join(second, 'report.html')}" in capsys.readouterr().out
        assert sorted(os.listdir(first)) == sorted(os.listdir(second))
        text_a, page_a = _parse(os.path.join(first, "report.html"))
        text_b, page_b = _parse(os.path.join(second, "report.html"))
        assert page_a.images == page_b.images and "unavailable" not in text_b  # inputs read from the paths
        assert _check_page(first, text_a, page_a) == _check_page(second, text_b, page_b)
        assert page_a.captions == page_b.captions
    COMM.Barrier()


def test_report_command_errors_are_one_line_on_every_rank(result, shared_tmp):
    parser = _report_parser()
    missing = os.path.join(shared_tmp, "nowhere")
    args = parser.parse_args(["report", missing])
    with pytest.raises(UserInputError, match="no such directory"):
        args.run(args)
    out = os.path.join(shared_tmp, "incomplete")
    _save(result, out)
    if COMM.rank == 0:
        meta_path = os.path.join(out, "registration.json")
        meta = _read_json(meta_path)
        meta["complete"] = False
        _write_json(meta_path, meta)
    COMM.Barrier()
    args = parser.parse_args(["report", out])
    with pytest.raises(UserInputError, match="incomplete"):
        args.run(args)
    if COMM.rank == 0:
        meta["complete"] = True
        _write_json(meta_path, meta)
    COMM.Barrier()
    args = parser.parse_args(["report", out, "--slices", "1", "2", str(N)])
    with pytest.raises(UserInputError, match="outside the grid 24x24x24"):
        args.run(args)
    if COMM.rank == 0:
        assert not {"report.html", "slices.png"} & set(os.listdir(out)), "nothing is drawn for a bad --slices"
    args = parser.parse_args(["report", out, "--slices", "0", "5", str(N - 1)])
    assert args.run(args) == 0
    if COMM.rank == 0:
        with open(os.path.join(out, "report.html")) as fh:
            assert "slices i=0, j=5, k=23" in fh.read()
    COMM.Barrier()


@pytest.mark.parametrize("argv, quiet, wanted", [
    ([], False, True), ([], True, False), (["--report"], True, True), (["--no-report"], False, False),
    (["--report", "--no-report"], False, False),
])
def test_report_options(argv, quiet, wanted):
    parser = argparse.ArgumentParser()
    rp.add_report_options(parser)
    args = parser.parse_args(argv + ["--slices", "3", "4", "5"])
    args.quiet = quiet
    assert rp.report_wanted(args) is wanted and args.slices == [3, 4, 5]


def test_workload_groups_and_levels():
    work = {"fft": {"count": 3, "seconds": 2.0}, "interpolation": {"count": 1, "seconds": 1.0},
            "interpolation_plan": {"count": 1, "seconds": 0.5}, "halo_exchange": {"count": 2, "seconds": 0.25},
            "alltoallv": {"count": 2, "seconds": 0.125}, "regularization": {"count": 4, "seconds": 9.0},
            "total": {"count": 1, "seconds": 10.0}}
    assert rp._workload_groups(work) == {"FFT": 2.0, "interpolation": 1.5, "communication": 0.375, "other": 6.125}
    del work["total"]
    assert "other" not in rp._workload_groups(work)
    history = [{"iteration": i, "beta": b} for i, b in [(0, 1.0), (1, 1.0), (2, 0.1), (3, 0.1), (0, 0.1), (1, 0.1)]]
    assert rp._levels(history) == [2, 4]  # beta changes at 2; the counter restarts at 4 (a re-solve, same beta)
    history = [dict(h, level=n // 3) for n, h in enumerate({"iteration": n} for n in range(6))]
    assert rp._levels(history) == [3]  # a "level" entry, when present


def test_the_warped_row_takes_movings_grey_scale(tmp_path, monkeypatch):
    """Interpolation undershoots below MOVING's minimum at edges: on its own percentile scale
    the warped background would turn grey; on MOVING's it stays black like MOVING's."""
    moving = np.zeros((N, N, N))
    moving[6:18, 6:18, 6:18] = 1.0
    warped = moving.copy()
    warped[5, :, :] = -0.3  # a ring of undershoot beside the edge
    shown = []
    monkeypatch.setattr(rp._Mosaic, "show", lambda self, ax, image, axis, row=0, **kw: shown.append((row, kw)))
    mosaic = rp._Mosaic(moving.shape, np.eye(4), None, 3)
    rp._draw_slices(str(tmp_path), mosaic, [("fixed", moving + 2.0, ""), ("moving", moving, ""),
                                            ("warped moving", warped, "")])
    scale = {row: (kw["vmin"], kw["vmax"]) for row, kw in shown}
    assert scale[2] == scale[1] != scale[0]
    assert rp._grey_range([warped[:, :, N // 2]])[0] < scale[1][0], "the warped image's own scale differs"
