"""Accuracy side by side on real brain pairs: claire_py's settings vs DIPY SyN and ANTs SyN.

For every pair (``real_pairs.py``) and every claire_py setting (``--settings``, a ``;``-separated
list of ``claire register`` flag sets; ``defaults`` = no flags), runs ``mpiexec -n RANKS claire
register`` (``bench_fidelity.run``), then, in the same run and on the same files:

* **DIPY SyN** (``dipy.align.imwarp.SymmetricDiffeomorphicRegistration``) with ``CCMetric(3,
  radius=4)`` (a 9-voxel box, DIPY's tutorial setting) and DIPY's default ``level_iters=[100,
  100, 25]``, one process;
* **ANTs SyN** when ``antspyx`` is installed: ``ants.registration(type_of_transform="SyNOnly",
  syn_metric="CC", syn_sampling=4, reg_iterations=(100, 70, 50, 20), flow_sigma=3,
  total_sigma=0, grad_step=0.1)``: the deformable stage of ``antsRegistrationSyN.sh -t so`` with
  CC (radius 4), no affine stage (the pairs are pre-aligned), ITK threads = RANKS.

Every row: mean Dice of the tissue labels (per label too; labels warped as each tool does it:
claire_py by per-label indicators and the most probable label, ANTs by ``genericLabel``, DIPY
by nearest neighbour),
relative mismatch ``||warped - fixed|| / ||moving - fixed||`` of the intensities rescaled to
[0, 1] (the same measure for every tool), det(grad y) min by the tool's own estimate (claire_py's
``det_grad_y``, ANTs' ``create_jacobian_determinant_image``; DIPY has none) and by central
differences of the map (the same code for every tool), and the wall time of the registration
(claire_py: the whole command; DIPY/ANTs: the library call plus warping the image and labels).

The peers come with ``.venv/bin/pip install -e ".[peers]"`` (dipy, antspyx); without antspyx
the ANTs rows, without dipy the DIPY rows are skipped with a message.

Run (the accuracy table of benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/bench_accuracy.py --pairs mni_colin_2mm,colin_mni_2mm,na01_na02,na02_na01 \\
        --settings "defaults;--preset accurate" --peers dipy --json /tmp/acc.json
    .venv/bin/python benchmarks/bench_accuracy.py --pairs mni_colin_2mm,na01_na02 --peers dipy,ants
"""

import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import ROOT  # noqa: E402
from bench_fidelity import central_difference_det, map_det, run  # noqa: E402
from real_pairs import prepare  # noqa: E402


def _load(stem):
    import nibabel as nib

    img, lab = nib.load(stem + ".nii.gz"), nib.load(stem + "_tissues.nii.gz")
    return _unit(np.asanyarray(img.dataobj).astype(np.float64)), np.asanyarray(lab.dataobj).astype(np.int32), \
        img.affine


def _unit(a, like=None):
    """``a`` rescaled as ``like`` (default ``a``) is rescaled to [0, 1]."""
    like = a if like is None else like
    return (a - like.min()) / (like.max() - like.min())


def _dice(fixed_labels, labels):
    ks = [k for k in np.unique(fixed_labels) if k > 0]
    return [float(2 * np.sum((fixed_labels == k) & (labels == k))
                  / max(np.sum(fixed_labels == k) + np.sum(labels == k), 1)) for k in ks]


def _row(tool, pair, fixed, moving, fixed_labels, moving_labels, warped, warped_labels, det_min, cd, seconds):
    before = _dice(fixed_labels, moving_labels)
    after = before if warped_labels is None else _dice(fixed_labels, warped_labels)
    return dict(name="register_accuracy", tool=tool, pair=pair, shape="x".join(map(str, fixed.shape)),
                wall=seconds, dice_before=float(np.mean(before)), dice=float(np.mean(after)), dice_labels=after,
                mismatch=float(np.linalg.norm(warped - fixed) / np.linalg.norm(moving - fixed)),
                det_min=det_min, cd_min=float(cd.min()), cd_nonpositive=int((cd <= 0).sum()))


def claire(pair, stems, flags, ranks, outroot):
    import nibabel as nib

    meta = run(ROOT, pair, *stems, flags, ranks, outroot)
    out = meta["out"]
    (fixed, fl, _), (moving, ml, _) = _load(stems[0]), _load(stems[1])
    warped = _unit(np.asanyarray(nib.load(os.path.join(out, "warped.nii.gz")).dataobj).astype(np.float64),
                   np.asanyarray(nib.load(stems[1] + ".nii.gz").dataobj))
    cd = central_difference_det(os.path.join(out, "deformation_map.nii.gz"))
    row = _row("claire_py " + (" ".join(flags) or "defaults"), pair, fixed, moving, fl, ml, warped, None,
               meta["det_min"], cd, meta["wall"])
    # the labels as claire register warps them (per-label indicators, the most probable label)
    row.update(dice=meta["dice"], dice_labels=meta["dice_labels"], solve=meta["solve"], gn=meta["gn"],
               matvecs=meta["matvecs"], beta=meta["beta"])
    return row


def dipy_syn(pair, stems):
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    (fixed, fl, affine), (moving, ml, _) = _load(stems[0]), _load(stems[1])
    t0 = time.perf_counter()
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3, radius=4))
    mapping = sdr.optimize(fixed, moving, static_grid2world=affine, moving_grid2world=affine)
    warped = mapping.transform(moving)
    wl = mapping.transform(ml, interpolation="nearest")
    seconds = time.perf_counter() - t0
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in fixed.shape], indexing="ij"), axis=-1)
    x_world = grid @ affine[:3, :3].T + affine[:3, 3]
    cd = map_det(x_world + mapping.get_forward_field(), affine)
    return _row("dipy SyN CC r4", pair, fixed, moving, fl, ml, warped, wl.astype(np.int32), float("nan"), cd,
                seconds)


def ants_syn(pair, stems, ranks):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ranks)
    import ants
    import nibabel as nib

    (fixed, fl, affine), (moving, ml, _) = _load(stems[0]), _load(stems[1])
    f_img, m_img = ants.image_read(stems[0] + ".nii.gz"), ants.image_read(stems[1] + ".nii.gz")
    ml_img = ants.image_read(stems[1] + "_tissues.nii.gz")
    t0 = time.perf_counter()
    reg = ants.registration(f_img, m_img, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=4,
                            reg_iterations=(100, 70, 50, 20), flow_sigma=3, total_sigma=0, grad_step=0.1)
    warped = reg["warpedmovout"].numpy().astype(np.float64)
    wl = ants.apply_transforms(f_img, ml_img, reg["fwdtransforms"], interpolator="genericLabel").numpy()
    seconds = time.perf_counter() - t0
    warped = _unit(warped, m_img.numpy())
    det = ants.create_jacobian_determinant_image(f_img, reg["fwdtransforms"][0]).numpy()
    # the warp is an ITK displacement in LPS millimetres: RAS = diag(-1, -1, 1) LPS
    u = np.squeeze(np.asanyarray(nib.load(reg["fwdtransforms"][0]).dataobj)).astype(np.float64)
    u[..., :2] *= -1
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in fixed.shape], indexing="ij"), axis=-1)
    cd = map_det(grid @ affine[:3, :3].T + affine[:3, 3] + u, affine)
    return _row("ants SyN CC r4", pair, fixed, moving, fl, ml, warped, wl.astype(np.int32), float(det.min()), cd,
                seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="mni_colin_2mm,colin_mni_2mm,na01_na02,na02_na01")
    parser.add_argument("--settings", default="defaults;--preset accurate",
                        help="';'-separated claire register flag sets ('defaults' = none)")
    parser.add_argument("--peers", default="dipy,ants", help="which of dipy, ants to run (when installed)")
    parser.add_argument("--ants-pairs", help="run ANTs only on these pairs (default: every pair; it is slow)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "claire_py", "real_pairs"))
    parser.add_argument("--out", default="/tmp/claire_accuracy", help="where the registrations are written")
    parser.add_argument("--json")
    args = parser.parse_args()
    pairs = prepare(args.cache)
    peers = [p for p in args.peers.split(",") if p]
    print(f"{'pair':>14} {'tool':>44} {'wall s':>7} {'Dice':>13} {'per label':>17} {'mismatch':>8} "
          f"{'det min':>7} {'cd min':>7} {'(<=0)':>5}", flush=True)

    def report(pair, row):
        print(f"{pair:>14} {row['tool'][:44]:>44} {row['wall']:7.1f} {row['dice_before']:.3f}->{row['dice']:.3f} "
              f"{' '.join(f'{d:.3f}' for d in row['dice_labels']):>17} {row['mismatch']:8.3f} "
              f"{row['det_min']:7.3f} {row['cd_min']:7.3f} {row['cd_nonpositive']:5d}", flush=True)
        append_json(args.json, [dict(row, n=row["shape"], dtype="float32", ranks=args.ranks, threads=0,
                                     value=row["dice"], unit="mean Dice")])

    for pair in args.pairs.split(","):
        for setting in args.settings.split(";"):
            flags = [] if setting.strip() == "defaults" else shlex.split(setting)
            report(pair, claire(pair, pairs[pair], flags, args.ranks, args.out))
        if "dipy" in peers:
            try:
                import dipy  # noqa: F401
            except ImportError:
                print("(dipy is not installed: pip install dipy for the DIPY rows)")
            else:
                report(pair, dipy_syn(pair, pairs[pair]))
        if "ants" in peers and (not args.ants_pairs or pair in args.ants_pairs.split(",")):
            try:
                import ants  # noqa: F401
            except ImportError:
                print("(antspyx is not installed: pip install antspyx for the ANTs rows)")
            else:
                report(pair, ants_syn(pair, pairs[pair], args.ranks))


if __name__ == "__main__":
    main()
