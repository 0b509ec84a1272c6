"""Peak memory of ``claire register`` per rank, against ``claire info``'s prediction.

Runs the command as a user types it (defaults, the pair's tissue labels, the report) under
``mpiexec -n P`` for each ``--ranks`` (oversubscribed beyond the cores), and reads each rank's
peak RSS (``ru_maxrss`` at the end, from the log) and ``registration.json``'s peaks by phase.
Prints rank 0's peak over the median of the other ranks' (issue 18: at most 1.25 at 4 ranks on
a pair of at least 160³) and the measured largest peak over ``claire info --ranks P --json``'s
``per_rank_bytes`` (the model: within 25 %), and the peak by the end of the preparation (the
``setup`` phase) over the model's ``phases.prepare``, and by the end of the solve over
``phases.solve``.

Run (benchmarks/RESULTS.md, issue 18)::

    .venv/bin/python benchmarks/bench_memory_cli.py --pair mni_colin_1mm --ranks 1,2,4 --json /tmp/mem_cli.json
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import VENV  # noqa: E402
from bench_fidelity import register_command  # noqa: E402
from real_pairs import prepare  # noqa: E402

_PER_RANK = re.compile(r"peak memory \(RSS\):.*\(per rank: ([\d. ]+) GB\)")


def predicted(shape, ranks):
    out = subprocess.run([os.path.join(VENV, "claire"), "info", "--shape", *map(str, shape), "--ranks", str(ranks),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["memory"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="mni_colin_1mm")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--flags", default="", help="extra flags of claire register")
    parser.add_argument("--json")
    args = parser.parse_args()
    stems = prepare(os.path.expanduser("~/.cache/claire_py/real_pairs"))[args.pair]
    print(f"{'P':>3} {'grid':>13} {'rank 0 GB':>10} {'others (median) GB':>19} {'ratio':>6} {'model GB':>9} "
          f"{'largest / model':>16} {'peak phase':>12} {'prepare GB':>11} {'/ model':>8} {'solve GB':>9} "
          f"{'/ model':>8} {'wall s':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (int(r) for r in args.ranks.split(",")):
            out = os.path.join(tmp, f"p{ranks}")
            wall, meta, log = register_command(VENV, *stems, out, args.flags.split(), ranks)
            peaks = [float(x) * 1e9 for x in _PER_RANK.search(log).group(1).split()]
            others = statistics.median(peaks[1:]) if ranks > 1 else peaks[0]
            model = predicted(meta["grid"], ranks)
            by_phase = {phase: max(v) for phase, v in meta["peak_rss_bytes"].items()}
            phase = next(p for p, v in by_phase.items() if v >= 0.99 * max(by_phase.values()))
            prepared = by_phase["setup"]  # the peak by the end of the preparation (read, affine, setup)
            solved = by_phase["solve"]  # ... and of the solve (the peaks are running maxima)
            print(f"{ranks:>3} {'x'.join(map(str, meta['grid'])):>13} {peaks[0] / 1e9:>10.3f} {others / 1e9:>19.3f} "
                  f"{peaks[0] / others:>6.2f} {model['per_rank_bytes'] / 1e9:>9.3f} "
                  f"{max(peaks) / model['per_rank_bytes']:>16.2f} {phase:>12} {prepared / 1e9:>11.3f} "
                  f"{prepared / model['phases']['prepare']:>8.2f} {solved / 1e9:>9.3f} "
                  f"{solved / model['phases']['solve']:>8.2f} {wall:>7.1f}", flush=True)
            common = dict(n="x".join(map(str, meta["grid"])), dtype="float32", ranks=ranks,
                          threads=max(1, (os.cpu_count() or 1) // ranks), unit="B")
            rows += [dict(common, name="register_cli_peak_rss_rank0", value=peaks[0],
                          reference="median of the other ranks", reference_value=others),
                     dict(common, name="register_cli_peak_rss_largest", value=max(peaks),
                          reference="claire info per_rank_bytes", reference_value=model["per_rank_bytes"]),
                     dict(common, name="register_cli_peak_rss_prepare", value=prepared,
                          reference="claire info phases.prepare", reference_value=model["phases"]["prepare"]),
                     dict(common, name="register_cli_peak_rss_solve", value=solved,
                          reference="claire info phases.solve", reference_value=model["phases"]["solve"])]
    append_json(args.json, rows)


if __name__ == "__main__":
    main()
