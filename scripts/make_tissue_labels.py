"""Three tissue classes (1 CSF, 2 GM, 3 WM) by 3-class k-means (1-D, Lloyd) of the
intensities inside the brain (voxels > 0 after smoothing-free thresholding at 5 % of max).

Run from the repository root to (re)make ``data/*_tissues.nii.gz``; ``tissue_labels`` serves
the benchmarks' real pairs too (``benchmarks/real_pairs.py``).
"""
import nibabel as nib
import numpy as np
from scipy import ndimage


def tissue_labels(a):
    """uint8 labels of the intensity image ``a``: 0 outside the brain, 1, 2, 3 by intensity."""
    brain = a > 0.05 * a.max()
    brain = ndimage.binary_opening(brain, iterations=1)
    v = a[brain]
    c = np.percentile(v, [10, 50, 90])
    for _ in range(100):
        lab = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        new = np.array([v[lab == k].mean() for k in range(3)])
        if np.allclose(new, c):
            break
        c = new
    out = np.zeros(a.shape, np.uint8)
    out[brain] = lab + 1
    return out


if __name__ == "__main__":
    for name in ("mni152_2009_t1_2mm", "colin27_t1_2mm", "claire_brain01", "claire_brain02"):
        img = nib.load(f"data/{name}.nii.gz")
        out = tissue_labels(np.asarray(img.dataobj, float))
        print(name, [(out == k).sum() for k in (1, 2, 3)])
        nib.save(nib.Nifti1Image(out, img.affine), f"data/{name}_tissues.nii.gz")
