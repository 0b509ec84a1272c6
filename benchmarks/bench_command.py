"""The time budget of the whole ``claire register`` command, phase by phase and rank by rank.

For each case (``--cases``; a real pair of ``real_pairs.py`` and a flag set), runs the command
as a user types it (report included), ``--repeat`` times interleaved with the other cases, and
reads from the run itself: the wall time of ``mpiexec`` (the launcher's start and exit
included), each phase's seconds per rank (``registration.json``'s ``"timing"``: startup = the
interpreter's start to the command, imports and MPI initialisation; read; setup = decomposition,
FFTW plans, images scattered, smoothed and normalised, the distance prepared; affine, the affine
stage's optimisation and MOVING resampled through it; solve; the outputs
derived and gathered: warp, labels (and Dice), det, displacement (with det by central
differences and the velocity); write; report, from the log), the launcher's share (wall minus the phases of the slowest rank), each rank's peak RSS
(``ru_maxrss``, from the log) and their sum, *outside* = the wall time less the two
optimisations (affine and solve), Gauss-Newton iterations, matvecs and Dice. The
figures of a case are those of its run with the median wall time.

With ``--peer`` DIPY SyN (``bench_accuracy.dipy_syn``: CC radius 4, DIPY's default levels, one
process) registers each case's pair once in the same run, for the ratio. With ``--claire BIN``
the original CLAIRE (built by ``benchmarks/build_claire.sh``) registers each case's pair once,
as its users run it (``mpirun -np RANKS BIN -mr FIXED -mt MOVING -x OUT/ -velocity
-deftemplate -detdefgrad``, its defaults: the problem of ``--preset claire``), on the same
number of ranks: its wall time, its own "time to solution", Gauss-Newton iterations and
matvecs. ``--floors`` measures
what the outside-the-solve phases cannot go below on this machine: ``mpiexec -n P python -c
pass`` (launcher and interpreter), the same importing ``claire_py.cli`` (imports, numba's cache
load, MPI init), reading the pair with nibabel, and writing the outputs' bytes with fsync.

Cases: ``2mm`` (CLAIRE's pair na01_na02, 128x150x128, defaults), ``1mm`` (na01_na02_x2,
256x300x256, defaults), ``accurate`` (na01_na02, ``--preset accurate``), ``mni`` (the bundled
MNI/Colin pair, 99x117x95, defaults), ``mni-accurate``; or ``PAIR:FLAGS`` for any other.

Run (the performance tables of benchmarks/RESULTS.md)::

    .venv/bin/python benchmarks/bench_command.py --cases 2mm,accurate,mni --repeat 3 --peer --floors --json /tmp/cmd.json
    .venv/bin/python benchmarks/bench_command.py --cases 1mm --json /tmp/cmd.json
    .venv/bin/python benchmarks/bench_command.py --cases 2mm,1mm --tree /tmp/old --tree . --repeat 2  # A/B
    .venv/bin/python benchmarks/bench_command.py --cases 2mm --claire /opt/claire/bin/claire  # and CLAIRE
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import ROOT, VENV  # noqa: E402
from bench_fidelity import register_command  # noqa: E402
from real_pairs import prepare  # noqa: E402

CASES = {
    "2mm": ("na01_na02", ""),
    "1mm": ("na01_na02_x2", ""),
    "accurate": ("na01_na02", "--preset accurate"),
    "mni": ("mni_colin_2mm", ""),
    "mni-accurate": ("mni_colin_2mm", "--preset accurate"),
}
PHASES = ("startup", "read", "setup", "affine", "solve", "warp", "labels", "det", "displacement", "write", "report")
_MEMORY = re.compile(r"peak memory \(RSS\): rank 0 ([\d.]+) GB, largest other rank ([\d.]+) GB, sum over ranks "
                     r"([\d.]+) GB")
_REPORT = re.compile(r"time \(slowest rank per phase\):.* report ([\d.]+) s")


def register(pair, stems, flags, ranks, out, venv=VENV):
    """One ``claire register`` run (of the tree whose ``.venv/bin`` is ``venv``); its wall time
    and what the run recorded of itself."""
    wall, meta, log = register_command(venv, *stems, out, flags, ranks)
    memory, report = _MEMORY.search(log), _REPORT.search(log)
    if memory is None:
        raise RuntimeError(f"no peak-memory line in the log of the run in {out}")
    timing = dict(meta["timing"], report=[float(report.group(1))] + [0.0] * (ranks - 1) if report else [0.0])
    slowest = {phase: max(timing.get(phase, [0.0])) for phase in PHASES}
    return dict(pair=pair, flags=" ".join(flags), ranks=ranks, shape="x".join(map(str, meta["grid"])), wall=wall,
                timing=timing, slowest=slowest, launcher=wall - sum(slowest.values()),
                outside=wall - slowest["solve"] - slowest["affine"], rss_rank0=float(memory.group(1)) * 1e9,
                rss_other=float(memory.group(2)) * 1e9, rss_sum=float(memory.group(3)) * 1e9,
                gn=sum(1 for h in meta["history"] if h["iteration"] > 0),
                matvecs=meta["workload"]["hessian_matvec"]["pcg_iterations"],
                dice=float(np.mean(meta["dice"]["after"])), out=out)


def claire_peer(binary, mpirun, stems, ranks, out):
    """The original CLAIRE on the pair ``stems`` (fixed, moving): wall seconds, its time to
    solution, Gauss-Newton iterations and matvecs (from its log)."""
    os.makedirs(out, exist_ok=True)
    cmd = [mpirun, "--allow-run-as-root", "-np", str(ranks), binary, "-mr", stems[0] + ".nii.gz",
           "-mt", stems[1] + ".nii.gz", "-x", out + "/", "-velocity", "-deftemplate", "-detdefgrad", "-verbosity", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr

    def count(label):
        match = re.search(rf"\[ {label}\s+(\d+)", log)
        return int(match.group(1)) if match else None

    solution = re.search(r"elapsed cpu time .*?; ([\d.eE+-]+)\)", log)
    return dict(wall=wall, solve=float(solution.group(1)) if solution else None, gn=count("newton iterations"),
                matvecs=count("hessian matrix vector products"))


def _wall(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def _shape(stem):
    import nibabel as nib

    return nib.load(stem + ".nii.gz").shape[:3]


def floors(stems, ranks, out, repeat):
    """Seconds that the phases outside the solve cannot go below here (median of ``repeat``)."""
    import nibabel as nib

    mpiexec, python = os.path.join(VENV, "mpiexec"), os.path.join(VENV, "python")
    launcher = statistics.median(_wall([mpiexec, "-n", str(ranks), python, "-c", "pass"]) for _ in range(repeat))
    imports = statistics.median(_wall([mpiexec, "-n", str(ranks), python, "-c", "import claire_py.cli; "
                                       "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"]) for _ in range(repeat))
    t0 = time.perf_counter()
    sizes = [np.asanyarray(nib.load(stem + suffix).dataobj).size for stem in stems
             for suffix in (".nii.gz", "_tissues.nii.gz")]
    read = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".nii.gz"))
    blob, path = os.urandom(1 << 20), os.path.join(out, ".floor.partial")
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(-(-nbytes // len(blob))):
            fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    write = time.perf_counter() - t0
    os.unlink(path)
    return {"launcher and interpreter": launcher, "imports and MPI init": imports - launcher,
            f"read the pair ({sum(sizes) / 1e6:.0f} M voxels)": read,
            f"write {nbytes / 1e6:.0f} MB with fsync": write}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="2mm,accurate", help=f"comma-separated: {', '.join(CASES)} or PAIR:FLAGS")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="DIPY SyN on each case's pair, in the same run")
    parser.add_argument("--floors", action="store_true", help="measure the floors of the outside-the-solve phases")
    parser.add_argument("--claire", metavar="BIN", help="the original CLAIRE's binary: register each pair with it too")
    parser.add_argument("--claire-mpirun", default="mpirun", help="the launcher of CLAIRE's MPI (default: mpirun)")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "claire_py", "real_pairs"))
    parser.add_argument("--out", default="/tmp/claire_command", help="where the registrations are written")
    parser.add_argument("--tree", action="append",
                        help="code tree(s) with a .venv, each case run by each in turn (an A/B in one run; "
                             "default: this one)")
    parser.add_argument("--json")
    args = parser.parse_args()
    pairs = prepare(args.cache)
    cases, trees = [], args.tree or [ROOT]
    for name in args.cases.split(","):
        pair, flags = CASES[name] if name in CASES else name.split(":", 1)
        for tree in trees:
            label = name + (f"@{os.path.basename(os.path.abspath(tree))}" if len(trees) > 1 else "")
            cases.append((label, pair, shlex.split(flags), os.path.join(tree, ".venv", "bin")))
    runs = {name: [] for name, *_ in cases}
    for _ in range(args.repeat):  # interleaved: a drift in the machine's load hits every case alike
        for name, pair, flags, venv in cases:
            out = os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name))
            runs[name].append(register(pair, pairs[pair], flags, args.ranks, out, venv))
    peers = {}
    if args.peer:
        from bench_accuracy import dipy_syn

        for pair in dict.fromkeys(pair for _, pair, *_ in cases):
            peers[pair] = dipy_syn(pair, pairs[pair])

    claire = {}
    if args.claire:
        for pair in dict.fromkeys(pair for _, pair, *_ in cases):
            claire[pair] = claire_peer(args.claire, args.claire_mpirun, pairs[pair], args.ranks,
                                       os.path.join(args.out, "claire_" + pair))
    print(f"{'case':>12} {'grid':>11} {'wall':>6} {'outside':>7} " + " ".join(f"{p:>7}" for p in PHASES)
          + f" {'launch':>6} {'GN':>3} {'mv':>4} {'Dice':>6} {'RSS 0':>6} {'other':>6} {'sum GB':>6}"
          + (f" {'DIPY s':>7} {'DIPY/us':>7}" if peers else ""))
    rows = []
    for name, pair, flags, _ in cases:
        walls = [r["wall"] for r in runs[name]]
        r = sorted(runs[name], key=lambda r: r["wall"])[len(walls) // 2]
        peer = peers.get(pair)
        print(f"{name:>12} {r['shape']:>11} {r['wall']:6.1f} {r['outside']:7.2f} "
              + " ".join(f"{r['slowest'][p]:7.2f}" for p in PHASES)
              + f" {r['launcher']:6.2f} {r['gn']:3d} {r['matvecs']:4d} {r['dice']:6.3f} {r['rss_rank0'] / 1e9:6.2f} "
              f"{r['rss_other'] / 1e9:6.2f} {r['rss_sum'] / 1e9:6.2f}"
              + (f" {peer['wall']:7.1f} {peer['wall'] / r['wall']:7.2f}" if peer else ""), flush=True)
        common = dict(n=r["shape"], dtype="float32", ranks=args.ranks, threads=1, case=name, pair=pair,
                      flags=r["flags"], walls=walls)
        rows.append(dict(common, name="command_wall", value=r["wall"], unit="s",
                         **({"reference": "dipy SyN CC r4, 1 process", "reference_value": peer["wall"],
                             "reference_dice": peer["dice"]} if peer else {}),
                         timing=r["timing"], launcher=r["launcher"], gn=r["gn"], matvecs=r["matvecs"], dice=r["dice"]))
        rows.append(dict(common, name="command_outside_solve", value=r["outside"], unit="s"))
        rows.append(dict(common, name="command_peak_rss_sum", value=r["rss_sum"], unit="bytes",
                         rss_rank0=r["rss_rank0"], rss_other=r["rss_other"]))
    if peers:
        for pair, peer in peers.items():
            print(f"DIPY SyN on {pair}: {peer['wall']:.1f} s, mean Dice {peer['dice']:.3f}")
    for pair, peer in claire.items():
        print(f"CLAIRE on {pair}, {args.ranks} ranks: {peer['wall']:.1f} s wall, {peer['solve']:.1f} s to solution, "
              f"{peer['gn']} GN iterations, {peer['matvecs']} matvecs; "
              + ", ".join(f"{name} {peer['wall'] / r['wall']:.2f}x" for name, p, *_ in cases if p == pair
                          for r in [sorted(runs[name], key=lambda r: r["wall"])[len(runs[name]) // 2]]))
        rows.append(dict(name="claire_command_wall", n="x".join(map(str, _shape(pairs[pair][0]))), dtype="float64",
                         ranks=args.ranks, threads=1, pair=pair, value=peer["wall"], unit="s",
                         time_to_solution=peer["solve"], gn=peer["gn"], matvecs=peer["matvecs"]))
    if args.floors:
        name, pair, *_ = cases[0]
        for what, seconds in floors(pairs[pair], args.ranks, runs[name][0]["out"], max(3, args.repeat)).items():
            print(f"floor: {what:40s} {seconds:6.2f} s")
            rows.append(dict(name="floor", what=what, n=runs[name][0]["shape"], dtype="float32", ranks=args.ranks,
                             threads=1, value=seconds, unit="s"))
    append_json(args.json, rows)


if __name__ == "__main__":
    main()
