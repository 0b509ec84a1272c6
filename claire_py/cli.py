"""The ``claire`` command: parse, build options, call the API. No numerics here.

User errors print one line (``claire: error: ...``) on rank 0 and every rank exits with
status 2; anything unexpected prints its traceback and aborts all ranks (status 1), so an
MPI job never hangs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .batch import add_batch_command
from .report import add_report_command, add_report_options, report_wanted, write_report

__all__ = ["main"]


def _comm():
    from .parallel import world

    return world()


def _cmd_info(args):
    import json
    import platform

    import mpi4py
    import mpi4py_fft
    import numba
    from mpi4py import MPI

    from ._version import __version__
    from .api import memory_model
    from .config import RegistrationConfig
    from .errors import UserInputError
    from .kernels import Decomposition

    comm = _comm()
    shape = tuple(args.shape)
    ranks = comm.Get_size() if args.ranks is None else args.ranks
    if args.ranks is not None and args.ranks < 1:
        raise UserInputError(f"--ranks {args.ranks}: give a number of ranks >= 1")
    d = RegistrationConfig()
    def model_of(**lean):
        return memory_model(shape, ranks, args.dtype, nt=d.transport.nt, relaxed=d.regularization.relaxed,
                            distance=d.distance.name, affine=d.affine.mode != "none", **lean)

    model = model_of()
    # what the memory guard falls back to on a node too small for the defaults
    leaner = {"recompute_g": model_of(keep_gradient=False)["per_rank_bytes"],
              "recompute_g_and_grad_m": model_of(keep_gradient=False, store_gradients=False)["per_rank_bytes"]}
    decomp = None if args.ranks is not None else Decomposition(shape, comm=comm, dtype=np.dtype(args.dtype))
    if comm.Get_rank() != 0:
        return 0
    if args.json:
        print(json.dumps({"shape": list(shape), "ranks": ranks, "precision": args.dtype, "nt": d.transport.nt,
                          "memory": {"per_rank_bytes": int(model["per_rank_bytes"]),
                                     "rank0_bytes": int(model["rank0_bytes"]),
                                     "phases": {k: int(v) for k, v in model["phases"].items()},
                                     "leaner_per_rank_bytes": {k: int(v) for k, v in leaner.items()}}}))
        return 0
    gib = 2.0 ** 30
    lines = [
        f"claire_py    {__version__} (Python {platform.python_version()})",
        f"numpy        {np.__version__}",
        f"numba        {numba.__version__} (threads available: {numba.config.NUMBA_NUM_THREADS})",
        f"mpi4py       {mpi4py.__version__}",
        f"mpi4py-fft   {mpi4py_fft.__version__} (FFTW backend)",
        f"MPI          {MPI.Get_library_version().splitlines()[0].strip()}",
    ]
    if decomp is not None:
        lines += [f"ranks        {comm.Get_size()}, threads per rank {decomp.threads}",
                  f"grid         {'x'.join(map(str, shape))} {decomp.dtype.name}: {decomp.layout} "
                  f"{decomp.proc_grid[0]}x{decomp.proc_grid[1]}, rank 0 block {decomp.local_shape}"]
    phases = ", ".join(f"{k} {v / gib:.2f}" for k, v in model["phases"].items())
    lines.append(f"memory       claire register on {'x'.join(map(str, shape))} over {ranks} rank(s), {args.dtype}, "
                 f"defaults: {model['per_rank_bytes'] / gib:.2f} GiB per rank, {model['rank0_bytes'] / gib:.2f} GiB "
                 f"on rank 0 (GiB by phase: {phases}); where a node has less, {leaner['recompute_g'] / gib:.2f} "
                 f"GiB recomputing the gradient after each Krylov solve, {leaner['recompute_g_and_grad_m'] / gib:.2f} "
                 "GiB also recomputing grad m(t_j) (slower matvecs)")
    print("\n".join(lines))
    return 0


def _cmd_smooth(args):
    from .api import smooth
    from .io import read_image, write_image

    comm = _comm()
    image = read_image(args.input, comm)
    if comm.Get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    t0 = time.perf_counter()
    data = None if image.data is None else image.data.astype(args.dtype)
    result = smooth(data, args.sigma, comm=comm, dtype=np.dtype(args.dtype))
    if comm.Get_rank() == 0:
        write_image(args.output, result.astype(np.float32), image.affine)
        print(f"wrote {args.output} ({'x'.join(map(str, image.shape))}, sigma={args.sigma} voxels, "
              f"{comm.Get_size()} rank(s), {time.perf_counter() - t0:.2f} s)")
    return 0


def _register_config(args):
    """Resolved RegistrationConfig: defaults, then --config FILE, then the flags given."""
    from .config import RegistrationConfig, _merged
    from .options import nested, overrides

    if args.config:
        cfg = RegistrationConfig.from_file(args.config)
        if args.preset:  # the file's settings refine the preset
            cfg = RegistrationConfig.preset(args.preset, RegistrationConfig.from_file(args.config, raw=True))
    else:
        cfg = RegistrationConfig.preset(args.preset) if args.preset else RegistrationConfig()
    given = overrides(args)
    return RegistrationConfig.from_dict(_merged(cfg.to_dict(), nested(given))) if given else cfg


def _check_outdir(comm, outdir, overwrite):
    """Check OUTDIR on rank 0 before the work starts (creating nothing); every rank raises
    the same one-line error if it is unusable."""
    from .outputs import prepare_outdir

    from .parallel import on_root

    on_root(comm, lambda: prepare_outdir(outdir, overwrite=overwrite, create=False))


def _cmd_register(args):
    import logging

    from .api import register
    from .checkpoint import FileCheckpoint, read_checkpoint
    from .parallel import on_root
    from .config import RegistrationConfig
    from .errors import UserInputError
    from .timing import peak_rss_bytes, seconds_since_process_start, summary

    startup = seconds_since_process_start()
    comm = _comm()
    if args.resume:  # inputs, options and OUTDIR come from the checkpoint
        meta = on_root(comm, lambda: read_checkpoint(args.resume)["meta"])
        for name in ("fixed", "moving", "mask", "labels_fixed", "labels_moving"):
            setattr(args, name, meta["inputs"].get(name))
        args.output, args.overwrite = args.resume, True
        config = RegistrationConfig.from_dict(meta["config"])
    else:
        config = _register_config(args)
    if args.dump_config:
        if comm.Get_rank() == 0:
            print(config.to_json())
        return 0
    if not (args.fixed and args.moving):
        raise UserInputError("give FIXED and MOVING images (or --resume OUTDIR)")
    if not args.output:
        raise UserInputError("give an output directory with -o OUTDIR")
    if args.quiet:
        logging.getLogger("claire_py").setLevel(logging.WARNING)
    _check_outdir(comm, args.output, args.overwrite)
    inputs = {"fixed": os.path.abspath(args.fixed), "moving": os.path.abspath(args.moving)}
    for name in ("mask", "labels_fixed", "labels_moving"):
        if getattr(args, name):
            inputs[name] = os.path.abspath(getattr(args, name))
    checkpoint = None
    if args.resume or args.checkpoint_every:
        if comm.Get_rank() == 0:
            os.makedirs(args.output, exist_ok=True)
        checkpoint = FileCheckpoint(args.output, comm, every=args.checkpoint_every or 1, resume=bool(args.resume),
                                    meta={"inputs": inputs, "config": config.to_dict()})
    if (args.labels_fixed is None) != (args.labels_moving is None):
        raise UserInputError("give both --labels-fixed and --labels-moving (or neither)")
    labels = None if args.labels_fixed is None else (args.labels_fixed, args.labels_moving)
    result = register(args.fixed, args.moving, config=config, comm=comm, mask=args.mask, labels=labels,
                      checkpoint=checkpoint, initial_transform=args.initial_transform, gather=False)
    startup = comm.gather(startup)
    timing = None if startup is None else dict({"startup": startup}, **result.timing)
    timing = result.save(args.output, overwrite=True, inputs=inputs, timing=timing,
                         suffix="." + args.output_format)
    page = None
    if report_wanted(args):  # every rank draws some of its figures
        t0 = time.perf_counter()
        page = write_report(args.output, fixed=result.fixed, moving=result.moving, slices=args.slices, comm=comm)
        seconds = comm.gather(time.perf_counter() - t0)
        if timing is not None:
            timing["report"] = seconds
    peaks = comm.gather(peak_rss_bytes())
    if comm.Get_rank() == 0:
        if checkpoint is not None:
            checkpoint.remove()  # the outputs are complete
        det_min, det_max = result.det_range
        first, last = result.history[0], result.history[-1]
        cd_min, cd_max = result.det_central_differences
        rows = [("time", f"{result.seconds:.1f} s on {result.ranks} rank(s), {config.precision}"),
                ("Gauss-Newton iterations", f"{sum(1 for h in result.history if h.iteration > 0)} "
                                            f"({result.stop_reason})"),
                ("beta", f"{result.beta:.3g}" + (" (trained)" if config.continuation.train else "")),
                ("Hessian matvecs", f"{result.workload['hessian_matvec']['pcg_iterations']}"),
                ("mismatch", f"{first.mismatch:.3f} -> {last.mismatch:.3f} (relative, smoothed images)"),
                ("det(grad y)", f"min {det_min:.3f}, max {det_max:.3f} (central differences of the map: "
                                f"min {cd_min:.3f}, max {cd_max:.3f})"),
                *([("Dice (mean)", f"{np.mean(result.dice['before']):.3f} -> {np.mean(result.dice['after']):.3f} "
                                   f"over {len(result.dice['labels'])} labels")] if result.dice else []),
                *([("affine stage", _affine_summary(result))] if result.affine_history else []),
                ("outputs", f"{args.output}/ (warped, velocity, deformation_map, displacement, affine.mat, "
                            "transform.h5, det_grad_y, residuals, registration.json)")]
        print("\n".join(f"{name:24s} {value}" for name, value in rows))
        if page is not None:
            print(f"{'report':24s} {page}")
        log = logging.getLogger("claire_py")
        log.info("time (slowest rank per phase): %s", summary(timing))
        log.info("peak memory (RSS): rank 0 %.2f GB, largest other rank %.2f GB, sum over ranks %.2f GB "
                 "(per rank: %s GB)", peaks[0] / 1e9, max(peaks[1:], default=0) / 1e9, sum(peaks) / 1e9,
                 " ".join(f"{p / 1e9:.3f}" for p in peaks))
        if det_min <= 0 or cd_min <= 0:
            where = " and ".join(name for name, lo in (("transported", det_min), ("by central differences of the map",
                                                                                     cd_min)) if lo <= 0)
            logging.getLogger("claire_py").warning(
                f"warning: det(grad y) <= 0 somewhere ({where}): the map folds; increase --beta or --nt")
    return 0


def _affine_summary(result):
    """One line: the affine part's rotation, scales and translation."""
    linear = np.asarray(result.transform)[:3, :3]
    u, sv, vt = np.linalg.svd(linear)
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    last = result.affine_history[-1]
    return (f"rotation {angle:.1f} deg, scales {' '.join(f'{x:.3f}' for x in sv)}, translation "
            f"{np.linalg.norm(result.transform[:3, 3]):.1f} mm ({last['metric']} {last['objective_after']:.3f})")


def _cmd_transport(args):
    from .blockio import write_volume
    from .deformation import DeformationMap

    comm = _comm()
    with DeformationMap.load(args.outdir, comm) as deformation:  # each rank its planes: no whole field anywhere
        planes = deformation.warp(args.image, labels=args.labels)
        shape, affine = deformation.output_grid
    write_volume(args.output, np.asfortranarray(planes if args.labels else planes.astype(np.float32)), comm,
                 shape=shape, affine=affine)
    if comm.Get_rank() == 0:
        print(f"wrote {args.output}: {args.image} deformed by the registration in {args.outdir}")
    return 0


def _cmd_jacobian(args):
    from mpi4py import MPI

    from .blockio import write_volume
    from .deformation import DeformationMap

    comm = _comm()
    with DeformationMap.load(args.outdir, comm) as deformation:
        det = deformation.jacobian()
        shape, affine = deformation.output_grid
    write_volume(args.output, np.asfortranarray(det, np.float32), comm, shape=shape, affine=affine)
    lo = comm.allreduce(float(det.min()) if det.size else np.inf, op=MPI.MIN)
    hi = comm.allreduce(float(det.max()) if det.size else -np.inf, op=MPI.MAX)
    if comm.Get_rank() == 0:
        print(f"wrote {args.output}: det(grad y) in [{lo:.3f}, {hi:.3f}]")
    return 0


def _cmd_invert(args):
    from .deformation import DeformationMap
    from .errors import UserInputError
    from .outputs import prepare_outdir, write_inverse
    from .parallel import on_root

    comm = _comm()
    deformation = DeformationMap.load(args.outdir, comm)
    if deformation.is_inverse:
        raise UserInputError(f"{args.outdir} holds an inverse already: its inverse is the registration it came from")
    _check_outdir(comm, args.output, args.overwrite)
    on_root(comm, lambda: prepare_outdir(args.output, overwrite=True))
    with deformation.inverse() as inverse:  # each rank its planes: no whole field anywhere
        lo, hi = write_inverse(args.output, args.outdir, inverse, deformation.config)
    if comm.Get_rank() == 0:
        print(f"wrote the inverse of {args.outdir} to {args.output}: det(grad y_inv) in [{lo:.3f}, {hi:.3f}]; "
              f"claire transport {args.output} IMAGE maps FIXED-grid images onto MOVING")
    return 0


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="claire",
        description="Spectral, MPI-parallel diffeomorphic image registration (CLAIRE in Python). "
                    "Run under MPI as: mpiexec -n P claire COMMAND ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, MPI, threads, the decomposition of a grid and the memory a "
                                    "registration on it needs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128), metavar=("N1", "N2", "N3"),
                   help="grid whose decomposition to show")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="working precision")
    p.add_argument("--ranks", type=int, metavar="P",
                   help="predict the memory of a run over P ranks (default: this job's), without planning its FFTs")
    p.add_argument("--json", action="store_true",
                   help='one JSON object: shape, ranks, precision and {"memory": {"per_rank_bytes", "rank0_bytes", '
                        '"phases"}}')
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("smooth", help="Gaussian smoothing of a NIfTI image on the distributed spectral grid",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="input image (.nii or .nii.gz, 3-D)")
    p.add_argument("-o", "--output", required=True, help="output image (.nii or .nii.gz), written atomically")
    p.add_argument("--sigma", type=_positive_float, default=1.0, help="standard deviation in voxels")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="working precision")
    p.set_defaults(run=_cmd_smooth)

    from .config import PRESETS, RegistrationConfig
    from .options import add_flags

    d = RegistrationConfig()  # the defaults shown below are the config's own
    p = sub.add_parser("register", help="register MOVING onto FIXED (NIfTI files)",
                       description="Register MOVING onto FIXED with CLAIRE's Gauss-Newton-Krylov solver. Options "
                                   "left unset take the value of --config FILE, else the defaults shown here "
                                   "(--dump-config prints the resolved configuration).")
    p.add_argument("fixed", nargs="?", help="reference image m_R (.nii/.nii.gz)")
    p.add_argument("moving", nargs="?", help="template image m_T, deformed onto FIXED")
    p.add_argument("-o", "--output", help="output directory (created); see claire_py/outputs.py for its files")
    p.add_argument("--config", help="JSON or YAML file with a RegistrationConfig")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="start from a named configuration: fast (||g||/||g0|| 5e-2, <= 10 PCG iterations per "
                        "step), fast-smooth (the same with the H2 seminorm, beta 1e-3), accurate (distance lncc, the "
                        "metric of SyN)")
    p.add_argument("--dump-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--mask", help="weight image in [0, 1] on FIXED's grid restricting the distance")
    p.add_argument("--labels-fixed", help="integer label map on FIXED's grid: print Dice per label before/after")
    p.add_argument("--labels-moving", help="integer label map on MOVING's grid (with --labels-fixed)")
    p.add_argument("--initial-transform", metavar="FILE",
                   help="ITK/ANTs affine (.mat text or binary, .txt, .tfm; FIXED's points into MOVING's, e.g. "
                        "ANTs' 0GenericAffine.mat) to start from; with --affine none it is the affine part")
    add_flags(p, d)
    p.add_argument("--overwrite", action="store_true", help="replace the results already in OUTDIR")
    p.add_argument("--output-format", choices=("nii.gz", "nii"), default="nii.gz",
                   help="image files of OUTDIR: nii.gz (every rank deflates its part, rank 0 writes the stream) or nii "
                        "(every rank writes its part in place: faster, larger; default nii.gz)")
    p.add_argument("--quiet", action="store_true", help="no per-iteration log, only the summary and warnings")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save the solver's progress in OUTDIR/checkpoint every N Gauss-Newton iterations and at "
                        "every continuation level (removed when the run completes)")
    p.add_argument("--resume", metavar="OUTDIR",
                   help="continue the interrupted run whose checkpoint is in OUTDIR (its inputs and options); "
                        "the result equals an uninterrupted run")
    add_report_options(p)
    p.set_defaults(run=_cmd_register)

    p = sub.add_parser("transport", help="deform another image (or label map) with a finished registration",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("outdir", help="the -o directory of a finished claire register")
    p.add_argument("image", help="image on MOVING's grid (.nii/.nii.gz)")
    p.add_argument("-o", "--output", required=True, help="deformed image, on FIXED's grid")
    p.add_argument("--labels", nargs="?", const="probability", choices=("nearest", "probability"),
                   help="IMAGE is an integer label map: transport each label's indicator and keep the most "
                        "probable (probability, the default with --labels) or take the nearest voxel")
    p.set_defaults(run=_cmd_transport)

    p = sub.add_parser("jacobian", help="det(grad y) of a finished registration",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("outdir", help="the -o directory of a finished claire register")
    p.add_argument("-o", "--output", required=True, help="output image (.nii/.nii.gz)")
    p.set_defaults(run=_cmd_jacobian)

    p = sub.add_parser("invert", help="the inverse map of a finished registration (the flow of -v)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("outdir", help="the -o directory of a finished claire register")
    p.add_argument("-o", "--output", required=True, help="directory for the inverse registration")
    p.add_argument("--overwrite", action="store_true", help="replace an inverse already in OUTPUT")
    p.set_defaults(run=_cmd_invert)
    add_report_command(sub)
    add_batch_command(sub)
    return parser


def main(argv=None):
    """Entry point of the ``claire`` console script; returns the exit status.

    Under MPI every rank ends with the same status and an error is printed once. After the
    command the ranks agree on the worst status through a non-blocking reduction on a private
    communicator: when every rank failed alike (user errors are raised collectively), or the
    others finished, the lowest failing rank prints its error and every rank returns the
    status. A rank that fails alone while the others wait in a collective it will never join
    prints its error and aborts the job after 10 s, so no rank ever hangs.
    """
    args = _build_parser().parse_args(argv)
    from mpi4py import MPI

    from .errors import UserInputError
    from .log import setup_logging

    comm = _comm()
    setup_logging(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        try:
            return args.run(args)
        except (UserInputError, ValueError, OSError) as exc:
            print(f"claire: error: {exc}", file=sys.stderr)
            return 2
    agreement = comm.Dup()  # never mixes with the command's own collectives
    prefix = f"[rank {rank}/{size}] " if rank else ""
    status, report = 0, ""
    try:
        status = args.run(args) or 0
    except (UserInputError, ValueError, OSError) as exc:
        status, report = 2, f"claire: error: {prefix}{exc}"
    except Exception:
        import traceback

        status, report = 1, prefix + traceback.format_exc().rstrip()
    except BaseException:  # KeyboardInterrupt, SystemExit: stop the whole job now
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    mine = np.array([status, size - rank if status else 0], dtype=np.int64)
    worst = np.zeros_like(mine)
    request = agreement.Iallreduce(mine, worst, op=MPI.MAX)
    deadline = time.monotonic() + 10.0
    while not request.Test():
        if status and time.monotonic() > deadline:  # failed alone: the others will never join
            print(report, file=sys.stderr)
            sys.stderr.flush()
            time.sleep(1.0)  # let the launcher forward the message before the abort tears the job down
            comm.Abort(int(status))
        time.sleep(0.01)
    agreement.Free()
    if worst[0] and report and rank == size - worst[1]:  # the lowest failing rank reports, once
        print(report, file=sys.stderr)
        sys.stderr.flush()
    return int(worst[0])


def console():
    """The ``claire`` console script (and ``python -m claire_py``): :func:`main`, then the
    output flushed, MPI finalised and the process ended at once, without Python's own
    teardown of the interpreter (numba's and llvmlite's modules, the OpenMP runtime, every
    object collected one by one), which took 0.7-0.8 s of a 2 mm registration's command after
    its last file was written. Every output is complete and on disk before :func:`main`
    returns; a non-zero status is the command's."""
    status = main()
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(int(status))
