"""``claire batch`` / ``claire_py.batch``: job lists, sweeps, failures, resuming, and the
results against registrations run alone. Under ``mpiexec -n 2`` with one rank per job, rank 0
hands out the jobs and rank 1 runs them; serially the one rank runs them in order."""

import argparse
import csv
import importlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import RegistrationConfig, UserInputError
from claire_py.batch import add_batch_command, batch, read_jobs

batch_module = importlib.import_module("claire_py.batch")
COMM = MPI.COMM_WORLD


def _pair(n, shift=0.3):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - shift * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


def _labels(image):
    return ((image > 0.4).astype(np.int16) + (image > 0.7)).astype(np.int16)


def _write_images(directory):
    """f16/m16, f24/m24 and a pair fl16/ml16 moved further (labels move by > 1/2 voxel) with
    its label maps lf16/lm16, as NIfTI in ``directory``."""
    if COMM.rank == 0:
        for n, prefix in ((16, ""), (24, ""), (16, "l")):
            fixed, moving = _pair(n, 0.6 if prefix else 0.3)
            nib.save(nib.Nifti1Image(fixed, np.eye(4)), os.path.join(directory, f"f{prefix}{n}.nii.gz"))
            nib.save(nib.Nifti1Image(moving, np.eye(4)), os.path.join(directory, f"m{prefix}{n}.nii.gz"))
        fixed, moving = _pair(16, 0.6)
        nib.save(nib.Nifti1Image(_labels(fixed), np.eye(4)), os.path.join(directory, "lf16.nii.gz"))
        nib.save(nib.Nifti1Image(_labels(moving), np.eye(4)), os.path.join(directory, "lm16.nii.gz"))
    COMM.Barrier()


def _write_text(path, text):
    COMM.Barrier()  # no rank is still reading the previous content
    if COMM.rank == 0:
        with open(path, "w") as fh:
            fh.write(text)
    COMM.Barrier()


def _meta(path):
    with open(os.path.join(path, "registration.json")) as fh:
        return json.load(fh)


JOBS_CSV = """# four jobs, paths relative to this file; 'bad' has no moving image
name,fixed,moving,labels_fixed,labels_moving,beta,max-iter,precision
a,f16.nii.gz,m16.nii.gz,,,1e-2,3,float64
b,f24.nii.gz,m24.nii.gz,,,1e-3,2,float64
c,fl16.nii.gz,ml16.nii.gz,lf16.nii.gz,lm16.nii.gz,,2,float64
bad,f16.nii.gz,nowhere.nii.gz,,,,2,float64
"""
SOLO = {"a": ({"beta": 1e-2}, 3, 16, 0.3), "b": ({"beta": 1e-3}, 2, 24, 0.3), "c": ({}, 2, 16, 0.6)}


def test_batch_records_failures_resumes_and_matches_solo_runs(shared_tmp):
    _write_images(shared_tmp)
    jobs, out = os.path.join(shared_tmp, "jobs.csv"), os.path.join(shared_tmp, "out")
    _write_text(jobs, JOBS_CSV)
    rows = batch(jobs, out, ranks_per_job=1)
    assert COMM.allgather(rows) == [rows] * COMM.size  # every rank returns the same rows
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["a", "b", "c", "bad"]
    assert [by_name[n]["status"] for n in ("a", "b", "c")] == ["complete"] * 3
    bad = by_name["bad"]
    assert bad["status"] == "failed" and "nowhere.nii.gz: no such file" in bad["error"]
    assert bad["iterations"] is None and "\n" not in bad["error"]
    for name, row in by_name.items():
        assert row["fixed"] == os.path.join(shared_tmp, {"b": "f24.nii.gz", "c": "fl16.nii.gz"}.get(name, "f16.nii.gz"))
    for name in ("a", "b", "c"):
        row = by_name[name]
        assert not row["resumed"] and row["ranks"] == 1 and row["error"] == ""
        assert 1 <= row["iterations"] <= SOLO[name][1] and row["matvecs"] >= row["iterations"]
        assert row["mismatch_after"] < row["mismatch_before"] and 0 < row["det_min"] < 1 < row["det_max"]
    assert by_name["a"]["dice_mean"] is None and 0 < by_name["c"]["dice_mean_before"] < by_name["c"]["dice_mean"] <= 1
    with open(os.path.join(out, "results.csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["name"], r["status"]) for r in table] == [(r["name"], r["status"]) for r in rows]
    assert table[1]["beta"] == "0.001" and table[2]["beta"] == "" and table[3]["error"] == bad["error"]
    assert float(table[2]["dice_mean"]) == by_name["c"]["dice_mean"]
    assert not os.path.exists(os.path.join(out, "bad", "registration.json"))

    # a rerun does no work: the complete jobs are read back, their files untouched
    stamps = {n: os.stat(os.path.join(out, n, "registration.json")).st_mtime_ns for n in ("a", "b", "c")}
    COMM.Barrier()
    again = batch(jobs, out, ranks_per_job=1)
    assert {n: os.stat(os.path.join(out, n, "registration.json")).st_mtime_ns for n in stamps} == stamps
    assert [r["resumed"] for r in again] == [True, True, True, False] and again[3]["status"] == "failed"
    strip = [{k: v for k, v in r.items() if k not in ("resumed", "seconds")} for r in rows]
    assert [{k: v for k, v in r.items() if k not in ("resumed", "seconds")} for r in again] == strip
    assert [r["seconds"] for r in again[:3]] == [r["seconds"] for r in rows[:3]]

    # a complete job whose options changed is an error, not a silent reuse
    _write_text(jobs, JOBS_CSV.replace("a,f16.nii.gz,m16.nii.gz,,,1e-2", "a,f16.nii.gz,m16.nii.gz,,,1e-1"))
    with pytest.raises(UserInputError, match=r"holds a complete registration with other inputs or options than job a "
                                             r"\(config.regularization.beta: 0.01 there, 0.1 now\)"):
        batch(jobs, out, ranks_per_job=1)

    # each job equals the same registration run alone on a group of the same size (one rank)
    for i, name in enumerate(("a", "b", "c")):
        if i % COMM.size != COMM.rank:
            continue
        options, iterations, n, shift = SOLO[name]
        cfg = RegistrationConfig.from_dict({"regularization": options, "newton": {"max_iterations": iterations},
                                            "precision": "float64"})
        meta = _meta(os.path.join(out, name))
        assert RegistrationConfig.from_dict(meta["config"]) == cfg
        fixed, moving = _pair(n, shift)
        labels = (_labels(fixed), _labels(moving)) if name == "c" else None
        solo = claire_py.register(fixed, moving, config=cfg, comm=MPI.COMM_SELF, labels=labels)
        assert [h["iteration"] for h in meta["history"]] == [h.iteration for h in solo.history]
        np.testing.assert_allclose([h["objective"] for h in meta["history"]], [h.objective for h in solo.history],
                                   rtol=1e-8)
        np.testing.assert_allclose([h["mismatch"] for h in meta["history"]], [h.mismatch for h in solo.history],
                                   rtol=1e-8)
        velocity = np.moveaxis(nib.load(os.path.join(out, name, "velocity.nii.gz")).get_fdata(), -1, 0)
        np.testing.assert_allclose(velocity * (2 * np.pi / n), solo.velocity, rtol=0,
                                   atol=1e-6 * np.abs(solo.velocity).max())  # stored as float32
        if labels is not None:
            assert meta["dice"] == solo.dice
    COMM.Barrier()


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="claire")
    add_batch_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_sweep_of_two_by_two_values_runs_four_jobs_with_their_options(shared_tmp, capsys):
    _write_images(shared_tmp)
    jobs, out = os.path.join(shared_tmp, "jobs.json"), os.path.join(shared_tmp, "sweep")
    _write_text(jobs, json.dumps([{"name": "pair", "fixed": "f16.nii.gz", "moving": "m16.nii.gz", "max_iter": 1,
                                   "precision": "float64"},
                                  {"name": "gone", "fixed": "f16.nii.gz", "moving": "gone.nii.gz"}]))
    # all ranks in one group (P == K): the jobs run in order on every rank, which agree on failures
    status = _run_cli(["batch", jobs, "-o", out, "--ranks-per-job", str(COMM.size), "--preset", "fast",
                       "--sweep", "beta=1e-2,1e-3", "--sweep", "regnorm=h1s,h2s"])
    assert status == 1  # some job failed
    names = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    assert names == ["pair__beta=1e-2__regnorm=h1s", "pair__beta=1e-2__regnorm=h2s",
                     "pair__beta=1e-3__regnorm=h1s", "pair__beta=1e-3__regnorm=h2s"]
    for name in names:
        meta = _meta(os.path.join(out, name))
        beta, norm = name.split("__")[1][5:], name.split("__")[2][8:]
        assert meta["complete"] and meta["ranks"] == COMM.size
        assert meta["config"]["regularization"]["beta"] == float(beta)
        assert meta["config"]["regularization"]["norm"] == norm
        assert meta["config"]["newton"]["max_iterations"] == 1 and meta["config"]["precision"] == "float64"
        assert meta["config"]["newton"]["krylov"]["max_iterations"] == 10  # from the preset
    with open(os.path.join(out, "results.csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["name"][:4], r["beta"], r["regnorm"], r["status"]) for r in table] == [
        ("pair", "0.01", "h1s", "complete"), ("pair", "0.01", "h2s", "complete"), ("pair", "0.001", "h1s", "complete"),
        ("pair", "0.001", "h2s", "complete")] + [
        ("gone", beta, norm, "failed") for beta in ("0.01", "0.001") for norm in ("h1s", "h2s")]
    assert all("gone.nii.gz: no such file" in r["error"] for r in table[4:])
    if COMM.rank == 0:
        printed = capsys.readouterr().out
        assert "pair__beta=1e-3__regnorm=h2s  complete" in printed and "4 of 8 job(s) complete" in printed
        # the batch report: a plot against the swept values and a row per job
        import matplotlib.image

        page = open(os.path.join(out, "batch_report.html")).read()
        assert 'src="batch.png"' in page and page.count("<tr>") == 1 + 8 and "one line per regnorm" in page
        assert matplotlib.image.imread(os.path.join(out, "batch.png")).std() > 0
    COMM.Barrier()


def test_an_unexpected_exception_fails_its_job_only(shared_tmp, monkeypatch):
    _write_images(shared_tmp)
    real = batch_module.register

    def flaky(fixed, moving, **kwargs):
        if fixed.endswith("f24.nii.gz"):
            raise RuntimeError("solver\nexploded")
        return real(fixed, moving, **kwargs)

    monkeypatch.setattr(batch_module, "register", flaky)
    jobs = [{"fixed": os.path.join(shared_tmp, "f24.nii.gz"), "moving": os.path.join(shared_tmp, "m24.nii.gz")},
            {"fixed": os.path.join(shared_tmp, "f16.nii.gz"), "moving": os.path.join(shared_tmp, "m16.nii.gz"),
             "max_iter": "1", "precision": "float64", "incompressible": "no"}]
    rows = batch(jobs, os.path.join(shared_tmp, "flaky"), ranks_per_job=1)
    assert [r["name"] for r in rows] == ["m24_to_f24", "m16_to_f16"]  # default names: MOVING_to_FIXED
    assert [r["status"] for r in rows] == ["failed", "complete"]
    assert rows[0]["error"] == "RuntimeError: solver exploded" and rows[1]["incompressible"] is False


def test_an_interrupted_job_resumes_from_its_checkpoint_unless_its_options_changed(shared_tmp, monkeypatch):
    """``checkpoint_every``: a job stopped mid-solve (here by an exception at iteration 2) is
    continued from its checkpoint by the next run and ends as the uninterrupted one; a job
    whose options changed meanwhile starts afresh (the stale checkpoint is discarded)."""
    _write_images(shared_tmp)
    real, first = batch_module.register, []

    def watched(fixed, moving, *, stop_at=None, **kwargs):
        def callback(info):
            if not first:
                first.append(info.iteration)
            if info.iteration == stop_at:
                raise RuntimeError("interrupted")
        return real(fixed, moving, callback=callback, **kwargs)

    def run(name, beta, stop_at=None):
        first.clear()
        monkeypatch.setattr(batch_module, "register", lambda f, m, **kw: watched(f, m, stop_at=stop_at, **kw))
        job = {"name": "job", "fixed": os.path.join(shared_tmp, "f24.nii.gz"),
               "moving": os.path.join(shared_tmp, "m24.nii.gz"), "beta": beta, "gtol": 1e-6, "max_iter": 5,
               "precision": "float64"}
        [row] = batch([job], os.path.join(shared_tmp, name), ranks_per_job=1, checkpoint_every=1)
        starts = [s for s in COMM.allgather(first[:1]) if s]  # from the rank that ran the job
        return row, starts[0][0]

    whole, start = run("whole", 1e-3)
    assert whole["status"] == "complete" and start == 0
    stopped, _ = run("stopped", 1e-3, stop_at=2)
    assert stopped["status"] == "failed" and stopped["error"] == "RuntimeError: interrupted"
    assert os.path.exists(os.path.join(shared_tmp, "stopped", "job", "checkpoint", "state.json"))
    resumed, start = run("stopped", 1e-3)
    assert resumed["status"] == "complete" and start > 0  # continued, not started again
    assert not os.path.exists(os.path.join(shared_tmp, "stopped", "job", "checkpoint"))
    drop = ("name", "seconds")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    np.testing.assert_allclose([h["objective"] for h in _meta(os.path.join(shared_tmp, "stopped", "job"))["history"]],
                               [h["objective"] for h in _meta(os.path.join(shared_tmp, "whole", "job"))["history"]],
                               rtol=1e-12)

    run("changed", 1e-3, stop_at=2)
    changed, start = run("changed", 1e-2)  # other options: the checkpoint of beta = 1e-3 is not used
    assert changed["status"] == "complete" and start == 0 and changed["beta_final"] == 1e-2
    COMM.Barrier()


@pytest.mark.parametrize("jobs, kwargs, message", [
    ([{"fixed": "f.nii", "moving": "m.nii", "betta": 1}], {},
     r"job 1: unknown key\(s\) betta; valid: name, fixed, moving, labels_fixed, labels_moving, mask, preset, beta"),
    ([{"fixed": "f.nii", "moving": "m.nii", "beta": "small"}], {}, r"job 1: beta='small': could not convert"),
    ([{"fixed": "f.nii", "moving": "m.nii", "regnorm": "h4"}], {}, r"job 1: norm='h4': use one of h1s"),
    ([{"fixed": "f.nii", "moving": "m.nii", "max_iter": "2.5"}], {}, r"max_iter='2.5'"),
    ([{"fixed": "f.nii"}], {}, r"job 1: no moving image given"),
    ([{"fixed": "f.nii", "moving": "m.nii", "labels_fixed": "l.nii"}], {}, r"give both labels_fixed and labels_moving"),
    ([{"fixed": "a/f.nii", "moving": "m.nii"}, {"fixed": "b/f.nii", "moving": "m.nii"}], {},
     r"job name 'm_to_f' is used twice \(job 1 and job 2\)"),
    ([{"fixed": "f.nii", "moving": "m.nii", "name": "../up"}], {}, r"job name '../up' is not a safe directory name"),
    ([{"fixed": "f.nii", "moving": "m.nii", "beta": 1}], {"sweep": {"beta": [1, 2]}}, r"sets beta, which the sweep"),
    ([{"fixed": "f.nii", "moving": "m.nii"}], {"sweep": {"bogus": [1, 2]}}, r"sweep over 'bogus': not an option"),
    ([{"fixed": "f.nii", "moving": "m.nii"}], {"preset": "slow"}, r"preset 'slow' is unknown; use one of claire, fast"),
    ([{"fixed": "f.nii", "moving": "m.nii"}], {"ranks_per_job": 5},  # the suite runs 1, 2 and 4 ranks
     r"rank\(s\) cannot run groups of 5: launch P = 5 ranks .* or P = 1 \+ G\*5"),
    ([{"fixed": "f.nii", "moving": "m.nii"}], {"ranks_per_job": 0}, r"ranks per job 0 must be an integer >= 1"),
    ([], {}, r"the job list is empty"),
])
def test_bad_job_lists_raise_one_line_on_every_rank_before_any_work(shared_tmp, jobs, kwargs, message):
    out = os.path.join(shared_tmp, "never")
    with pytest.raises(UserInputError, match=message):
        batch(jobs, out, **kwargs)
    assert not os.path.exists(out)  # refused before anything was created


def test_job_files_csv_comments_yaml_and_cli_sweep_syntax(shared_tmp):
    path = os.path.join(shared_tmp, "jobs.csv")
    _write_text(path, "# comment\nfixed, moving, beta\nf.nii.gz, sub/m.nii.gz, \n\nf.nii.gz,m2.nii.gz,1e-3\n")
    entries, base = read_jobs(path)
    assert base == shared_tmp
    assert [e for _, e in entries] == [{"fixed": "f.nii.gz", "moving": "sub/m.nii.gz", "beta": ""},
                                       {"fixed": "f.nii.gz", "moving": "m2.nii.gz", "beta": "1e-3"}]
    assert entries[1][0].endswith("jobs.csv, line 5")
    _write_text(path, "fixed,moving\nf.nii,m.nii,extra\n")
    with pytest.raises(UserInputError, match="line 2: more cells than the header has columns"):
        read_jobs(path)
    yaml_path = os.path.join(shared_tmp, "jobs.yaml")
    _write_text(yaml_path, "- fixed: f.nii.gz\n  moving: m.nii.gz\n  beta: 1.0e-3\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(UserInputError, match="reading YAML needs PyYAML"):
            read_jobs(yaml_path)
    else:
        assert [e for _, e in read_jobs(yaml_path)[0]] == [{"fixed": "f.nii.gz", "moving": "m.nii.gz", "beta": 1e-3}]
    with pytest.raises(UserInputError, match="no such jobs file"):
        read_jobs(os.path.join(shared_tmp, "none.csv"))
    assert batch_module.parse_sweep(["beta=1e-2, 1e-3", "max-iter=5"]) == {"beta": ["1e-2", "1e-3"], "max_iter": ["5"]}
    for bad, message in ((["beta"], "write NAME=V1,V2"), (["beta=1", "beta=2"], "given twice")):
        with pytest.raises(UserInputError, match=message):
            batch_module.parse_sweep(bad)
