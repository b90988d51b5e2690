"""profiles/slurm on a real SLURM cluster: jobs submitted with sbatch, run by slurmd, collected.

The SLURM tests need a controller (CI starts a single-node one with `.ci/slurm-up`); without
`sbatch` or an answering controller they skip themselves, like the GPU tests without CUDA.
The workflow runs in a copy under tmp_path with the profile as written, except for what a
2-CPU CI node cannot honour (see docs/cluster.md): jobs ask for 1 CPU and 1 GB instead of
the profile's requests, and job status comes from `squeue` when `sacct` has no database.
"""

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles/slurm/config.yaml"
LOGDIR = ".snakemake/slurm_logs"

# A tiny demo: THINGS 3 concepts x 2 images + 1 test image; NSD 6 images, 2 of them shared.
STIMULI = {"image_size": 16, "things": {"n_concepts": 3, "images_per_concept": 2, "n_test_concepts": 1, "n_catch": 1},
           "nsd": {"n_images": 6, "n_concepts": 3, "n_shared": 2}}
SMALL = {"cpus_per_task": 1, "mem_mb": 1000}  # what every job asks for on the CI node


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _profile():
    return yaml.safe_load(PROFILE.read_text())


def _gpu_rules(profile):
    """Rules the profile gives a GPU (set-resources entries with gpu >= 1)."""
    return sorted(r for r, res in profile["set-resources"].items() if res.get("gpu", 0) >= 1)


@functools.cache
def _cluster_partitions():
    """Partitions of the answering SLURM controller, or the reason there is none (asked once:
    a sinfo without controller takes ~10 s to give up)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM not installed (no sbatch/sinfo on PATH); CI starts a cluster with .ci/slurm-up"
    try:
        out = _run("sinfo", "-h", "-o", "%R")
    except subprocess.TimeoutExpired:
        return "no SLURM controller answers (sinfo timed out); start one with .ci/slurm-up"
    if out.returncode != 0:
        return f"no SLURM controller answers (sinfo: {out.stderr.strip()}); start one with .ci/slurm-up"
    return frozenset(out.stdout.split())


def _cluster_or_skip(profile):
    """Skip unless a SLURM controller answers and has the profile's default partition."""
    partitions = _cluster_partitions()
    if isinstance(partitions, str):
        pytest.skip(partitions)
    partition = profile["default-resources"]["slurm_partition"]
    if partition not in partitions:
        pytest.skip(f"this SLURM cluster has no partition {partition!r} (profiles/slurm default); "
                    f"it has {sorted(partitions)}")


def _small_profile(profile, folder):
    """The profile with every job's CPU/memory request shrunk to SMALL, written to ``folder``."""
    profile = {**profile, "default-resources": {**profile["default-resources"], **SMALL},
               "set-resources": {r: {**res, **SMALL} for r, res in profile["set-resources"].items()}}
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _snakemake(workdir, profile_dir, *args):
    # Without slurmdbd, sacct has no data: the plugin must ask squeue (docs/cluster.md).
    status = [] if _run("sacct", "-X", "-n").returncode == 0 else ["--slurm-status-command", "squeue"]
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(profile_dir), *args, *status,
         "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "2"],
        cwd=workdir, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def _check_jobs_went_through_slurm(workdir, log, n_jobs, partition):
    """One sbatch submission per job, SLURM log files named by job id, and the controller
    lists the jobs (named by the run id) as COMPLETED in ``partition``. Returns their comments."""
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log))
    assert len(submitted) == n_jobs, log[-6000:]
    slurm_logs = {p.stem for p in (workdir / LOGDIR).rglob("*.log")}
    assert set(submitted.values()) <= slurm_logs, (sorted(slurm_logs), submitted)
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    queue = _run("squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%T|%P|%k")
    assert queue.returncode == 0, queue.stderr
    jobs = {row.split("|")[0]: row.split("|")[1:] for row in queue.stdout.split()}
    assert set(jobs) == set(submitted.values()), queue.stdout
    assert {(state, part) for state, part, _ in jobs.values()} == {("COMPLETED", partition)}, queue.stdout
    return {comment for *_, comment in jobs.values()}


def test_every_gpu_rule_is_routed_by_the_slurm_profile():
    """Rules declaring ``resources: gpu=1`` are exactly the profile's GPU entries, each with a partition."""
    rules = {}
    for smk in (ROOT / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.M | re.S):
            rules[name] = body
    assert "stimulus_table" in rules and "pca_features" in rules  # the parser sees the rules
    gpu = {name for name, body in rules.items() if re.search(r"^\s+gpu\s*=\s*1\b", body, re.M)}
    for smk in (ROOT / "rules").glob("*.smk"):  # `use rule A as B with:` inherits A's resources unless it sets its own
        for parent, name, body in re.findall(r"^use rule (\w+) as (\w+) with:\n(.*?)(?=^\S|\Z)", smk.read_text(),
                                             re.M | re.S):
            own = re.search(r"^\s+resources:", body, re.M)
            if (re.search(r"^\s+gpu\s*=\s*1\b", body, re.M) if own else parent in gpu):
                gpu.add(name)
    assert "extract_benchmark_features" in gpu  # the parser sees inherited resources
    declared = sorted(gpu)
    profile = _profile()
    assert declared == _gpu_rules(profile) and declared
    assert all(profile["set-resources"][r]["slurm_partition"] for r in declared)


def test_stimulus_stage_runs_through_slurm(tmp_path):
    profile = _profile()
    _cluster_or_skip(profile)
    for name in ("Snakefile", "rules", "workflow", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["stimuli"] = STIMULI
    (tmp_path / "config/config.yaml").write_text(yaml.safe_dump(config))
    targets = ["results/stimuli/things.parquet", "results/stimuli/nsd.parquet"]

    rc, log = _snakemake(tmp_path, _small_profile(profile, tmp_path / "profile"), *targets)
    assert rc == 0, log[-6000:]

    # The outputs: valid Parquet with the rows the demo generator was asked for.
    things = pd.read_parquet(tmp_path / targets[0])
    nsd = pd.read_parquet(tmp_path / targets[1])
    assert things.split.value_counts().to_dict() == {"train": 6, "test": 1}
    assert things.concept.nunique() == 3
    assert nsd.split.value_counts().to_dict() == {"train": 4, "shared": 2}
    assert list(nsd.hdf5_row) == list(range(6))

    comments = _check_jobs_went_through_slurm(tmp_path, log, 4, profile["default-resources"]["slurm_partition"])
    assert comments == {"rule_demo_stimuli_things", "rule_demo_stimuli_nsd",
                        "rule_stimulus_table_wildcards_things", "rule_stimulus_table_wildcards_nsd"}


def test_gpu_rules_on_a_cluster_without_gpus(tmp_path):
    """The profile as written asks SLURM for a GPU for the GPU rules; on a GPU-less cluster the
    documented edit (gpu: 0, a CPU partition) makes the same rules run on CPUs."""
    profile = _profile()
    _cluster_or_skip(profile)
    gpus = _run("sinfo", "-h", "-o", "%G").stdout
    cpu_partition = profile["default-resources"]["slurm_partition"]
    gpu_rules = _gpu_rules(profile)
    # Rules named and declared like the workflow's GPU rules; each job reports its allocation.
    (tmp_path / "Snakefile").write_text("".join(
        f"rule {r}:\n    output: '{r}.txt'\n    resources: gpu=1\n"
        "    shell: 'echo $SLURM_JOB_PARTITION ${{SLURM_GPUS_ON_NODE:-0}} > {output}'\n"
        for r in gpu_rules))
    targets = [f"{r}.txt" for r in gpu_rules]

    rc, log = _snakemake(tmp_path, _small_profile(profile, tmp_path / "as_written"), *targets)
    assert "--gpus=1" in log, log[-6000:]
    if "gpu" in gpus:  # a GPU cluster: the jobs get a GPU in the GPU partition
        assert rc == 0, log[-6000:]
    else:  # no GPU anywhere: SLURM refuses the request at submission
        assert rc != 0 and "Invalid generic resource" in log, log[-6000:]

    cpu_only = {**profile, "set-resources": {
        r: {**res, "gpu": 0, "slurm_partition": cpu_partition} if r in gpu_rules else res
        for r, res in profile["set-resources"].items()}}
    shutil.rmtree(tmp_path / LOGDIR, ignore_errors=True)
    rc, log = _snakemake(tmp_path, _small_profile(cpu_only, tmp_path / "cpu_only"), "--forceall", "--verbose",
                         *targets)
    assert rc == 0, log[-6000:]
    calls = re.findall(r"sbatch call: (.*)", log)
    assert len(calls) == len(gpu_rules) and not any("--gpus" in c for c in calls), calls
    for r in gpu_rules:
        assert (tmp_path / f"{r}.txt").read_text().split() == [cpu_partition, "0"]
    comments = _check_jobs_went_through_slurm(tmp_path, log, len(gpu_rules), cpu_partition)
    assert comments == {f"rule_{r}" for r in gpu_rules}
