"""The affine stage (issue 17): its cost beside the deformable solve, and what it buys.

Each pair runs ``claire register`` (``mpiexec -n RANKS``, ``--no-report``) at the defaults
(affine stage on) and with ``--affine none``, interleaved ``--repeat`` times. Per pair it prints
the wall seconds of the affine, setup, labels and solve phases (slowest rank, from
``registration.json``'s ``timing``; medians), the stage's whole cost (its phase plus the extra
setup time: MOVING's resampling through it) over the solve's, the whole command's time, and the
mean Dice before, after the affine part and after the deformable solve. The labels phase grows
too (each label's probability goes through the affine part): evaluation, not registration.

Pairs: those of :mod:`real_pairs` (``--pairs``), and ``mni_colin_2mm_moved`` — the bundled
Colin 27 moved by the similarity of ``tests/api/test_affine_interop.py`` (12 deg about z, 7 deg
about x, 4 % larger, shifted 6, -4, 3 mm; same header) onto the MNI152 template.

    .venv/bin/python benchmarks/bench_affine.py --pairs mni_colin_2mm,mni_colin_2mm_moved,na01_na02 \\
        --repeat 3 --json /tmp/affine.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import append_json  # noqa: E402
from bench_fidelity import register_command  # noqa: E402


def moved_copy(stem, out_stem):
    """``stem`` (and its tissue labels) moved by the similarity of the interop tests."""
    import nibabel as nib

    from claire_py.io import resample_to_grid
    from claire_py.solvers.affine import _rotation

    img = nib.load(stem + ".nii.gz")
    centre = img.affine[:3, :3] @ ((np.array(img.shape) - 1) / 2) + img.affine[:3, 3]
    s = np.eye(4)
    s[:3, :3] = (_rotation([0, 0, math.radians(12)]) @ _rotation([math.radians(7), 0, 0])) / 1.04
    s[:3, 3] = centre - s[:3, :3] @ centre + np.array([6.0, -4.0, 3.0])
    data = img.get_fdata()
    moved = np.clip(resample_to_grid(data, img.affine, img.affine, img.shape, order=3, transform=s),
                    data.min(), data.max())
    nib.save(nib.Nifti1Image(moved.astype(np.float32), img.affine), out_stem + ".nii.gz")
    lab = nib.load(stem + "_tissues.nii.gz")
    labels = resample_to_grid(np.asarray(lab.dataobj), lab.affine, lab.affine, lab.shape, order=0, transform=s)
    nib.save(nib.Nifti1Image(labels.astype(np.int16), lab.affine), out_stem + "_tissues.nii.gz")
    return out_stem


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="mni_colin_2mm,mni_colin_2mm_moved,na01_na02")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/claire_py/real_pairs"))
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    from real_pairs import prepare

    pairs = prepare(args.cache)
    work = tempfile.mkdtemp(prefix="bench-affine-")
    data = os.path.join(ROOT, "data")
    pairs["mni_colin_2mm_moved"] = (os.path.join(data, "mni152_2009_t1_2mm"),
                                    moved_copy(os.path.join(data, "colin27_t1_2mm"), os.path.join(work, "colin_moved")))
    venv = os.path.join(ROOT, ".venv", "bin")
    settings = {"affine": ["--no-report"], "none": ["--no-report", "--affine", "none"]}
    rows = []
    print(f"{'pair':>22} {'setting':>8} {'affine':>7} {'setup':>6} {'labels':>7} {'solve':>6} {'stage/solve':>12} "
          f"{'command':>8} {'Dice before':>12} {'affine':>7} {'after':>7}")
    for pair in args.pairs.split(","):
        fixed, moving = pairs[pair]
        runs = {name: [] for name in settings}
        for _ in range(args.repeat):
            for name, flags in settings.items():
                out = os.path.join(work, f"{pair}_{name}")
                wall, meta, _ = register_command(venv, fixed, moving, out, flags, args.ranks)
                runs[name].append((wall, meta))

        def phase(name, key):  # median over the repeats of the slowest rank's seconds
            return statistics.median(max(meta["timing"].get(key, [0.0])) for _, meta in runs[name])

        for name, results in runs.items():
            affine, solve = phase(name, "affine"), phase(name, "solve")
            # the stage's whole cost: its phase, and MOVING's resampling through it (in setup)
            stage = affine + max(phase(name, "setup") - phase("none", "setup"), 0.0)
            wall = statistics.median(w for w, _ in results)
            dice = results[-1][1]["dice"]
            before, after = float(np.mean(dice["before"])), float(np.mean(dice["after"]))
            mid = float(np.mean(dice["affine"])) if "affine" in dice else float("nan")
            print(f"{pair:>22} {name:>8} {affine:7.3f} {phase(name, 'setup'):6.2f} {phase(name, 'labels'):7.2f} "
                  f"{solve:6.2f} {stage / solve:12.3f} {wall:8.2f} {before:12.3f} {mid:7.3f} {after:7.3f}")
            common = dict(n=results[-1][1]["grid"], dtype=results[-1][1]["config"]["precision"], ranks=args.ranks,
                          threads=1, pair=pair, setting=name)
            rows += [dict(name="affine_stage", value=stage, unit="s", affine_phase=affine,
                          reference="solve phase", reference_value=solve, **common),
                     dict(name="register_command", value=wall, unit="s", **common),
                     dict(name="dice_mean", value=after, unit="dice", dice_before=before, dice_affine=mid, **common)]
    append_json(args.json, rows)
    print(json.dumps({"workdir": work}))


if __name__ == "__main__":
    main()
