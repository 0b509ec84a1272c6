"""Whole ``claire register`` runs on real brain pairs: convergence, accuracy, det(grad y), time.

For each pair of ``real_pairs.py`` and each code tree (``--tree``, a checkout with its own
``.venv``; default this one), runs ``TREE/.venv/bin/mpiexec -n RANKS TREE/.venv/bin/claire
register FIXED MOVING -o OUT --labels-fixed ... --labels-moving ... --no-report [FLAGS]`` and
reads its outputs: wall time of the command, solve time, Gauss-Newton iterations, Hessian
matvecs, stop reason, line-search steps, relative mismatch, mean Dice of the tissue labels
(before -> after), det(grad y) min/max as the tree writes it (``det_grad_y.nii.gz``) and by
central differences of its ``deformation_map.nii.gz`` (computed here, the same for every tree:
``det(I + D u)``, ``u = y - x`` in voxels, central differences), with the number of
voxels <= 0 of each, and the beta used (the trained one with ``--train``).

Run (the before/after table of benchmarks/RESULTS.md; an older checkout as ``--tree``)::

    .venv/bin/python benchmarks/bench_fidelity.py --pairs mni_colin_2mm,mni_colin_1mm --json /tmp/fid.json
    .venv/bin/python benchmarks/bench_fidelity.py --tree /tmp/old --pairs mni_colin_2mm --flags="--train binary"
    .venv/bin/python benchmarks/bench_fidelity.py --pairs na01_na02,na01_na02_x2
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import ROOT  # noqa: E402
from real_pairs import prepare  # noqa: E402


def central_difference_det(deformation_map_path):
    """``det(grad y)`` of a ``deformation_map.nii.gz`` (world mm, SPM-style ``y``) by central
    differences of ``u = y - x`` in voxels (:func:`map_det`)."""
    import nibabel as nib

    img = nib.load(deformation_map_path)
    return map_det(np.asanyarray(img.dataobj).astype(np.float64), img.affine)


def map_det(y, a):
    """``det(grad y)`` of a world-mm map ``y`` (``(*shape, 3)``) on a grid with affine ``a``, by
    central differences of ``u = y - x`` in voxels (one-sided at the faces: a map with an
    affine part is not periodic, and differences across the wrap-around reported folds there)."""
    y_vox = np.einsum("ab,...b->...a", np.linalg.inv(a[:3, :3]), y - a[:3, 3])
    u = y_vox - np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in y.shape[:3]], indexing="ij"), axis=-1)
    jac = np.empty(u.shape[:3] + (3, 3))
    for i in range(3):
        for j, du in enumerate(np.gradient(u[..., i])):
            jac[..., i, j] = (i == j) + du
    return np.linalg.det(jac)


def register_command(venv, fixed, moving, out, flags, ranks):
    """Run ``VENV/mpiexec -n RANKS VENV/claire register FIXED MOVING -o OUT`` with the pair's
    tissue labels and ``flags``; return its wall time, its ``registration.json`` and its log
    (stdout and stderr)."""
    cmd = [os.path.join(venv, "mpiexec"), "-n", str(ranks), os.path.join(venv, "claire"), "register",
           fixed + ".nii.gz", moving + ".nii.gz", "-o", out, "--overwrite",
           "--labels-fixed", fixed + "_tissues.nii.gz", "--labels-moving", moving + "_tissues.nii.gz", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "registration.json")) as fh:
        return wall, json.load(fh), proc.stdout + proc.stderr


def run(tree, pair, fixed, moving, flags, ranks, outroot):
    import nibabel as nib

    tag = "".join(c if c.isalnum() else "_" for c in " ".join(flags)).strip("_")
    out = os.path.join(outroot, f"{os.path.basename(os.path.abspath(tree))}_{pair}" + (f"_{tag}" if tag else ""))
    wall, meta, _ = register_command(os.path.join(tree, ".venv", "bin"), fixed, moving, out, ["--no-report", *flags],
                                     ranks)
    det = np.asanyarray(nib.load(os.path.join(out, "det_grad_y.nii.gz")).dataobj)
    cd = central_difference_det(os.path.join(out, "deformation_map.nii.gz"))
    hist = meta["history"]
    return dict(name="register_real_pair", tree=os.path.abspath(tree), pair=pair, flags=" ".join(flags), out=out,
                shape="x".join(map(str, det.shape)), ranks=ranks, wall=wall, solve=meta["seconds"],
                gn=sum(1 for h in hist if h["iteration"] > 0), matvecs=meta["workload"]["hessian_matvec"]["pcg_iterations"],
                converged=meta["converged"], stop=meta["stop_reason"], grad_rel=hist[-1]["grad_rel"],
                steps=[h["step"] for h in hist if h["iteration"] > 0], mismatch=hist[-1]["mismatch"],
                beta=meta["beta"], norm=meta["config"]["regularization"]["norm"],
                dice_before=float(np.mean(meta["dice"]["before"])), dice=float(np.mean(meta["dice"]["after"])),
                dice_labels=meta["dice"]["after"], det_min=float(det.min()), det_max=float(det.max()),
                det_nonpositive=int((det <= 0).sum()), cd_min=float(cd.min()), cd_max=float(cd.max()),
                cd_nonpositive=int((cd <= 0).sum()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="code tree(s) with a .venv (default: this one)")
    parser.add_argument("--pairs", default="mni_colin_2mm,colin_mni_2mm,mni_colin_1mm")
    parser.add_argument("--flags", default="", help="extra claire register flags, e.g. '--train binary'")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "claire_py", "real_pairs"))
    parser.add_argument("--out", default="/tmp/claire_fidelity", help="where the registrations are written")
    parser.add_argument("--json")
    args = parser.parse_args()
    pairs = prepare(args.cache)
    flags = shlex.split(args.flags)
    print(f"{'tree':>8} {'pair':>14} {'grid':>12} {'wall':>6} {'solve':>6} {'GN':>3} {'mv':>4} {'conv':>5} "
          f"{'mismatch':>8} {'Dice':>13} {'det min':>8} {'(<=0)':>5} {'cd min':>7} {'(<=0)':>5} {'det max':>7} "
          f"{'beta':>8}  steps", flush=True)
    for tree in args.tree or [ROOT]:
        for pair in args.pairs.split(","):
            row = run(tree, pair, *pairs[pair], flags, args.ranks, args.out)
            print(f"{os.path.basename(row['tree'])[:8]:>8} {pair:>14} {row['shape']:>12} {row['wall']:6.1f} "
                  f"{row['solve']:6.1f} {row['gn']:3d} {row['matvecs']:4d} {str(row['converged']):>5} "
                  f"{row['mismatch']:8.3f} {row['dice_before']:.3f}->{row['dice']:.3f} {row['det_min']:8.3f} "
                  f"{row['det_nonpositive']:5d} {row['cd_min']:7.3f} {row['cd_nonpositive']:5d} {row['det_max']:7.2f} "
                  f"{row['beta']:8.2e}  {','.join(f'{s:g}' for s in row['steps'])}", flush=True)
            append_json(args.json, [dict(row, n=row["shape"], dtype="float32", threads=0, value=row["wall"],
                                         unit="s")])


if __name__ == "__main__":
    main()
