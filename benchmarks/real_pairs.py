"""Real T1 brain pairs for the benchmarks, built from packages (nothing here is committed data).

* ``mni_colin_2mm``, ``colin_mni_2mm``: the bundled pair of ``data/`` (99x117x95, 2 mm), both
  directions.
* ``mni_colin_1mm``, ``colin_mni_1mm``: the MNI ICBM152 2009 template at 1 mm from the PyPI
  wheel of nilearn 0.14.1 and Colin 27 (``ch2bet.nii.gz``) from Debian's ``mricron-data``,
  resampled onto MNI's grid by world coordinates (trilinear) and both cropped to the brain's
  box, 160x192x160 (FFT-friendly; MNI's own 197x233x189 has prime factors 197 and 233).
* ``mni_colin_512`` (:func:`prepare_512`, built only on request: 2 GB of ``.nii``): the 1 mm pair
  upsampled by cubic splines by 8/3 (0.375 mm, 427x512x427) and padded with background to
  512^3, its tissue labels upsampled by nearest neighbours; the largest grid one 24 GB node
  registers.
* ``na01_na02``, ``na02_na01`` (128x150x128) and ``na01_na02_x2`` (256x300x256, the pair
  upsampled by cubic splines): CLAIRE's bundled brains (GPL-3.0), ``data/claire_brain01.nii.gz``
  and ``data/claire_brain02.nii.gz``.

Tissue labels (1 CSF, 2 GM, 3 WM) of every image come from ``scripts/make_tissue_labels.py``'s
intensity k-means, for Dice. :func:`prepare` downloads what is missing into ``cache``
(``pip download``, ``apt-get download``) and returns ``{pair: (fixed, moving)}`` of file
stems (``stem.nii.gz``, ``stem_tissues.nii.gz``).
"""

import glob
import os
import subprocess
import sys
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_tissue_labels import tissue_labels  # noqa: E402

NILEARN = "nilearn==0.14.1"
MNI_1MM = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
COLIN_1MM = "usr/share/mricron/templates/ch2bet.nii.gz"
CROP_1MM = (slice(18, 178), slice(20, 212), slice(0, 160))  # MNI voxels: the brain's box, 160x192x160


def _save(path_stem, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path_stem + ".nii.gz")
    nib.save(nib.Nifti1Image(tissue_labels(np.asarray(data, float)), affine), path_stem + "_tissues.nii.gz")


def _fetch(cache):
    """The 1 mm MNI template and Colin 27 files, downloaded into ``cache`` when missing."""
    mni, colin = os.path.join(cache, MNI_1MM), os.path.join(cache, COLIN_1MM)
    if not os.path.exists(mni):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", NILEARN, "-d", cache],
                       check=True)
        wheel = sorted(glob.glob(os.path.join(cache, "nilearn-*.whl")))[-1]
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(MNI_1MM, cache)
    if not os.path.exists(colin):
        subprocess.run(["apt-get", "download", "mricron-data"], check=True, cwd=cache, capture_output=True)
        deb = sorted(glob.glob(os.path.join(cache, "mricron-data_*.deb")))[-1]
        subprocess.run(["dpkg", "-x", deb, cache], check=True)
    return mni, colin


def prepare(cache):
    """Build the pairs into ``cache`` (once) and return ``{pair: (fixed_stem, moving_stem)}``."""
    import nibabel as nib
    from scipy import ndimage

    os.makedirs(cache, exist_ok=True)
    stem = lambda name: os.path.join(cache, name)  # noqa: E731
    pairs = {}
    for name, src in (("mni_2mm", "mni152_2009_t1_2mm"), ("colin_2mm", "colin27_t1_2mm")):
        if not os.path.exists(stem(name) + "_tissues.nii.gz"):
            img = nib.load(os.path.join(ROOT, "data", src + ".nii.gz"))
            _save(stem(name), np.asanyarray(img.dataobj), img.affine)
    pairs.update(mni_colin_2mm=(stem("mni_2mm"), stem("colin_2mm")), colin_mni_2mm=(stem("colin_2mm"), stem("mni_2mm")))
    if not os.path.exists(stem("colin_1mm") + "_tissues.nii.gz"):
        mni_path, colin_path = _fetch(cache)
        mni, colin = nib.load(mni_path), nib.load(colin_path)
        to_colin = np.linalg.inv(colin.affine) @ mni.affine  # MNI voxel -> Colin voxel
        moved = ndimage.affine_transform(np.asanyarray(colin.dataobj).astype(float), to_colin[:3, :3],
                                         to_colin[:3, 3], output_shape=mni.shape, order=1)
        affine = mni.affine.copy()
        affine[:3, 3] = mni.affine[:3, :3] @ np.array([s.start for s in CROP_1MM]) + mni.affine[:3, 3]
        _save(stem("mni_1mm"), np.asanyarray(mni.dataobj)[CROP_1MM], affine)
        _save(stem("colin_1mm"), moved[CROP_1MM], affine)
    pairs.update(mni_colin_1mm=(stem("mni_1mm"), stem("colin_1mm")), colin_mni_1mm=(stem("colin_1mm"), stem("mni_1mm")))
    for name in ("brain01", "brain02"):
        if not os.path.exists(stem(name + "_x2") + "_tissues.nii.gz"):
            img = nib.load(os.path.join(ROOT, "data", f"claire_{name}.nii.gz"))
            a = np.asanyarray(img.dataobj).astype(float)
            _save(stem(name), a, img.affine)
            up = np.clip(ndimage.zoom(a, 2, order=3, grid_mode=True, mode="grid-wrap"), 0, None)
            affine = img.affine.copy()
            affine[:3, :3] /= 2
            _save(stem(name + "_x2"), up, affine)
    pairs.update(na01_na02=(stem("brain01"), stem("brain02")), na02_na01=(stem("brain02"), stem("brain01")),
                 na01_na02_x2=(stem("brain01_x2"), stem("brain02_x2")))
    return pairs


def prepare_512(cache):
    """Build ``mni_colin_512`` from the 1 mm pair (see the module docstring) into ``cache``
    (once, ~2 min) and return ``(fixed_stem, moving_stem)``; files ``stem.nii`` and
    ``stem_tissues.nii`` (uncompressed: read by planes on every rank)."""
    import nibabel as nib
    from scipy import ndimage

    one_mm = prepare(cache)["mni_colin_1mm"]
    stems = tuple(os.path.join(cache, os.path.basename(s).replace("_1mm", "_512")) for s in one_mm)
    factor, n = 8 / 3, 512
    for src, dst in zip(one_mm, stems):
        if os.path.exists(dst + "_tissues.nii"):
            continue
        for suffix, order, dtype in (("", 3, np.float32), ("_tissues", 0, np.uint8)):
            img = nib.load(src + suffix + ".nii.gz")
            up = ndimage.zoom(np.asanyarray(img.dataobj).astype(np.float32 if order else np.uint8), factor,
                              order=order, grid_mode=True, mode="grid-constant")
            if order:
                np.clip(up, 0, None, out=up)
            before = [(n - s) // 2 for s in up.shape]
            out = np.zeros((n,) * 3, dtype)
            out[tuple(slice(b, b + s) for b, s in zip(before, up.shape))] = up
            del up
            affine = img.affine.copy()
            affine[:3, :3] /= factor
            # voxel centres: up[i] sits at (i + 1/2) / factor - 1/2 of the source, shifted by the padding
            offset = (0.5 / factor - 0.5) - np.array(before) / factor
            affine[:3, 3] = img.affine[:3, :3] @ offset + img.affine[:3, 3]
            nib.save(nib.Nifti1Image(out, affine), dst + suffix + ".nii")
            del out
    return stems
