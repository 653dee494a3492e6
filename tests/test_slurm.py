"""On a real one-node SLURM (scripts/local_slurm.sh: Debian's slurm-wlm + munge, started by the `slurm` fixture):
configs/launch/slurm.sbatch with 2 gloo processes (cpu_ddp) interrupted in each way a cluster interrupts a job, and a
sweep as a real job array; 2 nodes on one host; and `gpo-trl train` on 2 "machines" without SLURM (here so that the
two multi-node launches never run side by side on the 2 cores).

SLURM holds a requeued job for about two minutes before it may start again (its BeginTime); the tests start it at
once with `scontrol update StartTime=now`, as an administrator can. Everything else is SLURM's own behaviour.
"""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO
from test_distributed import SGD, one_process  # noqa: F401  (one_process: a fixture)
from test_cli import demo_paths
from gpo_trl.demo import prepare_demo_assets

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "scripts" / "local_slurm.sh"
SBATCH = REPO / "configs" / "launch" / "slurm.sbatch"
DEMO = str(REPO / "configs" / "demo.yaml")
# 500 steps of 2 x 4 pairs, a checkpoint every 10: the time-limit signal comes up to 30 s after the test shortens the
# limit (slurmctld checks limits every 30 s), so a run lasts well over that here (5 to 7 steps/s measured), with
# steps left for the interruptions after it
RUN = ["--max_steps", "500", "--save_strategy", "steps", "--save_steps", "10", "--logging_steps", "50",
       "--eval_before_training", "false", "--per_device_train_batch_size", "4", "--lr_scheduler_type", "linear"]


@pytest.fixture(scope="module")
def slurm():
    """The environment of a running one-node cluster; started (and installed with apt-get) here when needed."""
    if os.geteuid() != 0:
        pytest.skip("the slurm tests start a one-node SLURM (scripts/local_slurm.sh), which needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install slurm-wlm")
    directory = os.environ.get("GPO_SLURM_DIR", "/tmp/gpo-slurm")
    was_running = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.skip(f"SLURM could not be started: {started.stderr.strip().splitlines()[-1:]}")
    env = {**os.environ, "SLURM_CONF": f"{directory}/slurm.conf", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    yield env
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True)


@pytest.fixture(autouse=True)
def cancel_jobs_left_behind(request):
    """A failed test must not leave its jobs training on the cluster (and on the CPUs the next tests need)."""
    yield
    for name in ("slurm", "slurm_two_nodes"):
        if name in request.fixturenames:
            env = request.getfixturevalue(name)
            subprocess.run(["scancel", "--user", str(os.geteuid())], env=env, capture_output=True)


@pytest.fixture(scope="module")
def slurm_two_nodes(slurm):
    """A second cluster, of two nodes on this host (two slurmd; scripts/local_slurm.sh with GPO_SLURM_NODES=2)."""
    base = os.environ.get("GPO_SLURM_DIR", "/tmp/gpo-slurm")
    settings = {"GPO_SLURM_DIR": f"{base}-2nodes", "GPO_SLURM_NODES": "2", "GPO_SLURMCTLD_PORT": "6827",
                "GPO_SLURMD_PORT": "6828"}
    env = {**os.environ, **settings}
    was_running = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.skip(f"a 2-node SLURM could not be started on this host: {started.stderr.strip().splitlines()[-1:]}")
    yield {**slurm, "SLURM_CONF": f"{base}-2nodes/slurm.conf"}
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True)


def sbatch(env, *args) -> str:
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job(env, job_id) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, Reason, RunTime, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def scontrol(env, *args):
    result = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def wait_until(check, what: str, timeout=240, job_log: Path | None = None):
    started = time.time()
    while not check():
        if time.time() - started > timeout:
            tail = job_log.read_text()[-3000:] if job_log and job_log.exists() else ""
            pytest.fail(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(0.5)


def restart_now(env, job_id, restarts: int, log: Path):
    """Wait until the job is requeued (pending, `restarts` restarts), then let it start without SLURM's delay."""
    wait_until(lambda: (lambda j: j.get("JobState") == "PENDING" and j.get("Restarts") == str(restarts))(
        job(env, job_id)), f"job {job_id} requeued ({restarts})", job_log=log)
    # slurmd refuses a job whose new credential dates from the second its old one was revoked in ("Job credential
    # revoked", the job fails): measured with an array task started at once
    time.sleep(3)
    scontrol(env, "update", f"JobId={job_id}", "StartTime=now")


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoint-*/trainer_state.json"))


def seconds(runtime: str) -> int:
    parts = [int(x) for x in re.split("[-:]", runtime)]
    return sum(p * m for p, m in zip(reversed(parts), (1, 60, 3600, 86400)))


def assert_same_adapter(a: Path, b: Path):
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] == second[name]).all(), name


def test_slurm_sbatch_checkpoints_requeues_and_resumes_on_a_real_cluster(slurm, tmp_path):
    """One job, interrupted four times, each run in the same output_dir with --resume_from_checkpoint last:
    (d) TERM to the batch shell before any checkpoint exists: requeued, starts fresh;
    (b) the time limit's own `--signal=B:TERM@N` (sent by slurmctld, not the test) after a checkpoint: the ranks
        checkpoint, exit 3, the script requeues, the next run resumes;
    (a) TERM to the batch shell after a checkpoint (`scancel --signal=TERM --batch`, what preemption sends): the same;
    (c) `scontrol requeue` (what a node failure does) while training: SLURM requeues, the next run resumes from the
        last complete checkpoint.
    The final adapter equals an uninterrupted job's, bit for bit."""
    prepare_demo_assets(tmp_path / "m", tmp_path / "d")
    env = {**slurm, "GPUS_PER_NODE": "2"}
    common = ["--nodes", "1", "--gpus-per-node", "0", "--chdir", tmp_path]
    recipe = [SBATCH, DEMO, "cpu_ddp", "--model_name_or_path", tmp_path / "m", "--dataset_name", tmp_path / "d", *RUN]
    reference = sbatch({**env, "MAIN_PORT": "29631"}, *common, "--output", tmp_path / "reference.out", *recipe,
                       "--output_dir", tmp_path / "reference")
    # --signal=B:TERM@170 with a 30-minute limit: silent until the test shortens the limit in (b)
    log = tmp_path / "job.out"
    job_id = sbatch({**env, "MAIN_PORT": "29632"}, *common, "--output", log, "--time", "30",
                    "--signal", "B:TERM@170", *recipe, "--output_dir", tmp_path / "run")
    run = tmp_path / "run"

    # (d) as soon as srun has started the step (the ranks are still importing torch)
    wait_until(lambda: f"{job_id}.0" in subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], env=env,
                                                       capture_output=True, text=True).stdout, "the step started")
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=env, check=True)
    restart_now(env, job_id, 1, log)
    text = log.read_text()
    assert "before it could save a checkpoint; requeueing job" in text, text[-3000:]
    assert checkpoints(run) == []

    # (b) once the fresh run has a checkpoint, shorten the time limit so that its end is under 170 s away: slurmctld
    # sends the TERM at its next time-limit check (every 30 s), with over 2 minutes left to checkpoint and exit
    wait_until(lambda: checkpoints(run), "a first checkpoint", job_log=log)
    assert "No complete checkpoint yet: starting fresh" in log.read_text().split("(restart 1)")[1]
    elapsed = seconds(job(env, job_id)["RunTime"])
    scontrol(env, "update", f"JobId={job_id}", f"TimeLimit={math.ceil((elapsed + 130) / 60)}")
    restart_now(env, job_id, 2, log)
    text = log.read_text()
    assert text.count("SIGTERM received: passing it to the training processes") == 2
    assert "Training was interrupted after a checkpoint; requeueing job" in text, text[-3000:]
    assert "TIME LIMIT" not in text  # the job ended by itself, before the limit
    timed_out = checkpoints(run)[-1]
    scontrol(env, "update", f"JobId={job_id}", "TimeLimit=30")

    # (a) a newer checkpoint, then the TERM that preemption sends the batch shell: checkpoint, exit 3, requeue
    wait_until(lambda: checkpoints(run)[-1] > timed_out, "a checkpoint after resuming", job_log=log)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=env, check=True)
    restart_now(env, job_id, 3, log)
    assert log.read_text().count("Training was interrupted after a checkpoint; requeueing job") == 2
    preempted = checkpoints(run)[-1]

    # (c) a newer checkpoint, then `scontrol requeue`: SLURM ends the job (TERM to the script and the tasks, then
    # KILL after KillWait) and requeues it itself; the script does not requeue a second time
    wait_until(lambda: checkpoints(run)[-1] > preempted, "a checkpoint after resuming", job_log=log)
    before_requeue = checkpoints(run)[-1]
    scontrol(env, "requeue", job_id)
    restart_now(env, job_id, 4, log)
    text = log.read_text()
    assert "not requeueing it here" in text, text[-3000:]
    newest = checkpoints(run)[-1]
    assert newest >= before_requeue

    wait_until(lambda: job(env, job_id).get("JobState") == "COMPLETED", "the job completed", timeout=300,
               job_log=log)
    wait_until(lambda: job(env, reference).get("JobState") == "COMPLETED", "the reference job completed",
               job_log=tmp_path / "reference.out")
    text = log.read_text()
    resumed = re.findall(r"Resuming from \S*checkpoint-(\d+)", text)
    assert [int(step) for step in resumed] == [timed_out, preempted, newest], text[-3000:]
    assert_same_adapter(run, tmp_path / "reference")


def test_a_cancelled_job_stays_cancelled(slurm, tmp_path):
    """`scancel JOB` also sends the batch script a TERM; the script must not requeue a job its user cancelled."""
    log = tmp_path / "job.out"
    job_id = sbatch({**slurm, "GPUS_PER_NODE": "2", "MAIN_PORT": "29635"}, "--nodes", "1", "--gpus-per-node", "0",
                    "--chdir", tmp_path, "--output", log, SBATCH, DEMO, "cpu_ddp", "--output_dir", tmp_path / "run")
    wait_until(lambda: f"{job_id}.0" in subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], env=slurm,
                                                       capture_output=True, text=True).stdout, "the step started")
    subprocess.run(["scancel", job_id], env=slurm, check=True)
    wait_until(lambda: "not requeueing it here" in log.read_text(), "the script ended", job_log=log)
    wait_until(lambda: job(slurm, job_id).get("JobState") == "CANCELLED", "the job cancelled", job_log=log)
    assert job(slurm, job_id)["Restarts"] == "0"


def test_sweep_runs_as_a_job_array_and_a_preempted_task_resumes(slurm, tmp_path, monkeypatch):
    """`gpo-trl sweep --emit-slurm` + sbatch: each point is an array task; one is sent the preemption TERM after a
    checkpoint, is requeued and resumes; `--collect` gives the numbers of a local sweep of the same grid."""
    from gpo_trl.cli import main as cli

    root = tmp_path / "dir with spaces"
    root.mkdir()
    prepare_demo_assets(root / "m", root / "d")
    overrides = {"max_steps": 60, "save_strategy": "steps", "save_steps": 5, "eval_before_training": False,
                 "precompute_ref_log_probs": True, "model_name_or_path": str(root / "m"),
                 "dataset_name": str(root / "d"), "disable_tqdm": True, "per_device_train_batch_size": 4}

    def write(name):
        spec = {"base": DEMO, "output_dir": str(root / name), "grid": {"gpo_loss": ["logistic", "hinge"]},
                "overrides": overrides}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return str(root / f"{name}.yaml")

    local, array = write("local"), write("array")
    monkeypatch.chdir(root)
    directory = root / "slurm jobs"
    assert cli(["sweep", "--config", array, "--emit-slurm", str(directory)]) == 0
    script = directory / "sweep.sbatch"
    assert "#SBATCH --gpus" not in script.read_text()  # use_cpu: the tasks ask for no GPU
    array_job = sbatch(slurm, "--chdir", root, script)

    # point 0 (gpo_loss=logistic) is preempted once it has a checkpoint
    point = root / "array" / "gpo_loss=logistic"
    task = f"{array_job}_0"
    task_log = directory / "logs" / f"{array_job}_0.out"
    wait_until(lambda: checkpoints(point), "a checkpoint of point 0", job_log=task_log)
    subprocess.run(["scancel", "--signal=TERM", "--batch", task], env=slurm, check=True)
    restart_now(slurm, task, 1, task_log)
    assert "Point interrupted after a checkpoint; requeueing" in task_log.read_text()
    interrupted_at = checkpoints(point)[-1]
    assert interrupted_at < 60 and not (point / "adapter_model.safetensors").exists()

    assert cli(["sweep", "--config", local]) == 0  # meanwhile, the same grid here
    wait_until(lambda: all(job(slurm, f"{array_job}_{i}").get("JobState") == "COMPLETED" for i in (0, 1)),
               "both array tasks completed", job_log=task_log)
    assert f"checkpoint-{interrupted_at}" in task_log.read_text().split("requeueing")[-1]  # it resumed there
    assert cli(["sweep", "--config", array, "--collect"]) == 0

    def table(name):
        with open(root / name / "results.csv") as f:
            # not timings, nor eval_num_tokens: the count of tokens trained on restarts at 0 in a resumed run
            # (measured: 13914 after the resume, 16889 uninterrupted), it is not part of a checkpoint
            return {row["gpo_loss"]: {k: v for k, v in row.items() if k.startswith("eval_") and "runtime" not in k
                                      and "per_second" not in k and k != "eval_num_tokens"}
                    for row in csv.DictReader(f)}

    local_rows, array_rows = table("local"), table("array")
    assert set(local_rows) == {"logistic", "hinge"} and all(local_rows[k] for k in local_rows)
    assert array_rows == local_rows

    # A second --emit-slurm does not overwrite the script (the user may have edited it) unless told to
    (point.parent / "gpo_loss=hinge" / "result.json").unlink()
    assert cli(["sweep", "--config", array, "--emit-slurm", str(directory)]) == 2
    assert cli(["sweep", "--config", array, "--emit-slurm", str(directory), "--overwrite"]) == 0


def test_slurm_sbatch_on_two_nodes_matches_one_node(slurm, slurm_two_nodes, tmp_path):
    """configs/launch/slurm.sbatch with `--nodes 2` (two slurmd on this host, one process per node, rendezvous at the
    first node's name) trains the same adapter, bit for bit, as the same 2-process DDP run on one node."""
    prepare_demo_assets(tmp_path / "m", tmp_path / "d")
    recipe = [SBATCH, DEMO, "cpu_ddp", "--model_name_or_path", tmp_path / "m", "--dataset_name", tmp_path / "d",
              "--max_steps", "20", "--logging_steps", "10", "--eval_before_training", "false",
              "--per_device_train_batch_size", "4"]
    two = sbatch({**slurm_two_nodes, "GPUS_PER_NODE": "1", "MAIN_PORT": "29633"}, "--nodes", "2",
                 "--gpus-per-node", "0", "--chdir", tmp_path, "--output", tmp_path / "two.out", *recipe,
                 "--output_dir", tmp_path / "two")
    one = sbatch({**slurm, "GPUS_PER_NODE": "2", "MAIN_PORT": "29634"}, "--nodes", "1", "--gpus-per-node", "0",
                 "--chdir", tmp_path, "--output", tmp_path / "one.out", *recipe, "--output_dir", tmp_path / "one")
    # 420 s: a multi-node launch can wait out torch elastic's 300 s exit barrier after training (seen once, under the
    # full suite's load); the run itself takes under a minute
    wait_until(lambda: job(slurm_two_nodes, two).get("JobState") == "COMPLETED", "the 2-node job completed",
               timeout=420, job_log=tmp_path / "two.out")
    wait_until(lambda: job(slurm, one).get("JobState") == "COMPLETED", "the 1-node job completed", timeout=420,
               job_log=tmp_path / "one.out")
    log = (tmp_path / "two.out").read_text()
    assert "gpo-trl on 2 nodes x 1 GPUs" in log and "world size 2 (MULTI_CPU)" in log
    assert job(slurm_two_nodes, two)["NumNodes"] == "2"
    assert_same_adapter(tmp_path / "two", tmp_path / "one")


def test_two_machines_of_one_process_match_one_process_with_batch_2b(one_process, tmp_path):
    """What configs/launch/slurm.sbatch runs on each of 2 nodes: `gpo-trl train --num_machines 2 --machine_rank R
    --main_process_ip HOST ...`, here both "machines" on this host, one process each, each with its own node-local
    reference log-probs cache. Same standard as tests/test_distributed.py's 2-process test. It lives in this file so
    that it never runs beside the 2-node SLURM job (pytest-xdist --dist loadfile keeps a file on one worker): run
    together on 2 cores, both multi-node launches once waited out torch elastic's 300 s exit barrier."""
    import socket
    import subprocess

    from conftest import console_script

    root, (out_one, logs_one, weights_one) = one_process
    os.symlink(root / "assets", tmp_path / "assets")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    machines = [subprocess.Popen(
        [console_script("gpo-trl"), "train", "--config", DEMO, *demo_paths(tmp_path)[:-1], str(tmp_path / "two"), *SGD,
         "--per_device_train_batch_size", "4", "--precompute_ref_log_probs", "true",
         "--ref_logps_cache_dir", str(tmp_path / f"node{rank}" / "ref_logps"), "--accelerate_config", "cpu_ddp",
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True) for rank in (0, 1)]
    try:
        # 420 s: past torch elastic's 300 s exit barrier, which one launch waited out under the full suite's load
        outputs = [machine.communicate(timeout=420) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, 9)
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert "world size 2 (MULTI_CPU)" in outputs[0][0]
    # rank 0 computed and cached the reference log-probs on its node, sees that machine 1 cannot read them, says
    # so, and sends them over (gpo_trl.ref_precompute._precompute_ref_logps)
    assert list((tmp_path / "node0" / "ref_logps").glob("*.arrow"))
    assert not (tmp_path / "node1" / "ref_logps").exists()
    assert "is not shared: rank 1 cannot see" in outputs[0][1]
    history = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logs_two = [e for e in history if "loss" in e]
    assert len(logs_one) == len(logs_two) == 2
    for one, two in zip(logs_one, logs_two):
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), (one["step"], key)
    weights_two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-7, msg=name)
