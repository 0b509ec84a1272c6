"""``claire batch``'s results: one row per job (read back from its ``registration.json``),
``results.csv`` rewritten atomically as jobs finish, and the summary table."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np

from .batch_jobs import _PATHS, OPTIONS, _value_text
from .errors import UserInputError

log = logging.getLogger("claire_py.batch")

def _flat(nested, prefix=""):
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _read_record(directory):
    """The ``registration.json`` of ``directory`` when it says complete, else ``None``."""
    from .outputs import read_record

    try:
        return read_record(directory)
    except UserInputError:
        return None


def _row(job, **fields):
    row = {"name": job.name, **job.inputs, **job.options}
    row.update(fields)
    return row


def _complete_row(job, meta, resumed):
    history, dice = meta["history"], meta.get("dice")
    row = _row(job, status="complete", resumed=resumed, seconds=float(meta["seconds"]),
               iterations=sum(1 for h in history if h["iteration"] > 0),
               matvecs=int(meta["workload"]["hessian_matvec"]["pcg_iterations"]),
               mismatch_before=float(history[0]["mismatch"]), mismatch_after=float(history[-1]["mismatch"]),
               det_min=float(meta["det_grad_y"]["min"]), det_max=float(meta["det_grad_y"]["max"]),
               beta_final=float(meta["beta"]), converged=bool(meta["converged"]), stop_reason=meta["stop_reason"],
               ranks=int(meta["ranks"]), error="")
    if dice:
        row["dice_mean_before"] = float(np.mean(dice["before"])) if dice["before"] else float("nan")
        row["dice_mean"] = float(np.mean(dice["after"])) if dice["after"] else float("nan")
    return row


def _finished_row(job, error, seconds):
    """The row of a job that ran: read back from its ``registration.json``, or its failure."""
    if error is None:
        return _complete_row(job, _read_record(job.directory), resumed=False)
    return _row(job, status="failed", resumed=False, seconds=seconds, error=error)


def _columns(plan):
    inputs = [k for k in _PATHS if any(k in job.inputs for job in plan)]
    options = list(dict.fromkeys(k for job in plan for k in job.options))
    results = ["status", "resumed", "seconds", "iterations", "matvecs", "mismatch_before", "mismatch_after",
               "det_min", "det_max"]
    if "labels_fixed" in inputs:
        results += ["dice_mean_before", "dice_mean"]
    return ["name"] + inputs + options + results + ["beta_final", "converged", "stop_reason", "ranks", "error"]


def _write_csv(path, columns, rows):
    """Write ``rows`` to ``path`` atomically (a temporary file renamed onto it)."""
    from io import StringIO

    from .io import write_text

    text = StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else _value_text(row[k]) if k in OPTIONS else row[k]
                         for k in columns})
    write_text(path, text.getvalue())


class _Results:
    """The rows, kept on world rank 0 and rewritten to ``results.csv`` after each change."""

    def __init__(self, plan, outdir):
        self.plan, self.path = plan, os.path.join(outdir, "results.csv")
        self.rows = [job.record or _row(job, status="pending") for job in plan]
        self.columns = _columns(plan)
        self.done = sum(job.record is not None for job in plan)

    def set(self, index, row, final=True):
        self.rows[index] = row
        if final:
            self.done += 1
            if row["status"] == "complete":
                log.info("[%d/%d] %s: complete in %.1f s (%d iterations, mismatch %.3f, det(grad y) in [%.3f, %.3f])",
                         self.done, len(self.rows), row["name"], row["seconds"], row["iterations"],
                         row["mismatch_after"], row["det_min"], row["det_max"])
            else:
                log.info("[%d/%d] %s: failed: %s", self.done, len(self.rows), row["name"], row["error"])
        self.write(quiet=True)

    def write(self, quiet=False):
        """Rewrite the CSV; returns the error text instead of raising (``quiet``: log it)."""
        try:
            _write_csv(self.path, self.columns, self.rows)
        except OSError as exc:
            error = f"{self.path}: cannot write the results ({exc.strerror or exc})"
            if quiet:
                log.warning("warning: %s", error)
            return error
        return None

    def final(self):
        return [{k: row.get(k) for k in self.columns} for row in self.rows]


def _number(value, spec):
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def summary_table(rows, path=None):
    """A plain-text table of the rows of :func:`batch` (and a closing count line)."""
    width = max([len("job")] + [len(r["name"]) for r in rows])
    dice = any(r.get("dice_mean") is not None for r in rows)
    head = f"{'job':{width}}  {'status':8} {'seconds':>8} {'iter':>5} {'matvecs':>7} {'mismatch':>8} " \
           f"{'det(grad y)':>17}" + ("  Dice before -> after" if dice else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "complete":
            lines.append(f"{r['name']:{width}}  {r['status']:8} {_number(r.get('seconds'), '8.1f')}  "
                         f"{r.get('error') or ''}")
            continue
        line = (f"{r['name']:{width}}  {r['status']:8} {r['seconds']:8.1f} {r['iterations']:5d} {r['matvecs']:7d} "
                f"{r['mismatch_after']:8.3f} [{r['det_min']:7.3f}, {r['det_max']:7.3f}]")
        if r.get("dice_mean") is not None:
            line += f"  {r['dice_mean_before']:.3f} -> {r['dice_mean']:.3f}"
        lines.append(line)
    complete = sum(r["status"] == "complete" for r in rows)
    resumed = sum(bool(r.get("resumed")) for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    lines.append(f"{complete} of {len(rows)} job(s) complete ({resumed} from an earlier run), {failed} failed"
                 + (f"; rows in {path}" if path else ""))
    return "\n".join(lines)
