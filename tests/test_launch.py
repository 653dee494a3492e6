"""configs/launch/slurm.sbatch under a fake 2-node allocation, and the `--` passthrough of `gpo-trl train`.

A 2-node x 8-GPU allocation exists on no machine of the tests, so here `scontrol` and `srun` are stubs on PATH:
`scontrol show hostnames` prints the two nodes, `srun` runs its command once per node with SLURM_NODEID set, and
`gpo-trl` is a stub that prints its arguments. The arguments each node would run are then read by the real `gpo-trl
train` argument handling and accelerate's own `launch` parser. What the script does on a TERM (preemption, time
limit, requeue), and a real 2-node job, are tested on a real SLURM in tests/test_slurm.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from conftest import REPO
from gpo_trl.cli import accelerate_launch_args, parse_accelerate_args, split_launch_args, split_passthrough
from gpo_trl.recipe import ConfigError, parse_args

SBATCH = REPO / "configs" / "launch" / "slurm.sbatch"
RECIPE = str(REPO / "configs" / "demo.yaml")  # parses on this CPU (a GPU recipe with bf16 would not)


def stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def fake_allocation(tmp_path, srun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", f'echo "scontrol $*" >> {tmp_path}/scontrol.log\n'
         'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-node-a\\ngpu-node-b\\n"; fi\n')
    stub(bin_dir / "srun", srun_body)
    gpo = stub(bin_dir / "gpo-trl-stub", f'exec {sys.executable} -c "import json, os, sys; '
               f'print(json.dumps({{\'node\': os.environ[\'SLURM_NODEID\'], \'argv\': sys.argv[1:]}}))" "$@"\n')
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "gpu-node-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
            "GPO_TRL": str(gpo)}


# srun's stand-in: skip its own options, run the task command once per node (as srun does, one task per node)
PER_NODE_SRUN = ('while [[ "$1" == --* ]]; do shift; done\n'
                 'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')


def test_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:TERM@300", "#SBATCH --ntasks-per-node=1"):
        assert directive in text


def test_two_node_allocation_gives_each_node_its_rank_and_rank_0s_address(tmp_path):
    env = fake_allocation(tmp_path, PER_NODE_SRUN)
    result = subprocess.run(["bash", str(SBATCH), RECIPE, "multi_gpu", "--output_dir", "/shared/run", "--",
                             "--rdzv_backend", "c10d", "--max_restarts", "1"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    nodes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [n["node"] for n in nodes] == ["0", "1"]
    assert "scontrol show hostnames gpu-node-[a-b]" in (tmp_path / "scontrol.log").read_text()
    for rank, node in enumerate(nodes):
        command, *argv = node["argv"]
        assert command == "train"
        argv, passthrough = split_passthrough(argv)
        launch, recipe_args = split_launch_args(argv)
        training_args = parse_args(recipe_args)[1]  # the recipe part is a valid recipe
        assert training_args.resume_from_checkpoint == "last" and training_args.output_dir == "/shared/run"
        args = parse_accelerate_args(accelerate_launch_args(launch) + passthrough, recipe_args, launch_command_parser())
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, rank, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-a", 29500)  # fixed: same on all nodes
        assert Path(args.config_file).name == "multi_gpu.yaml"
        assert (args.rdzv_backend, args.max_restarts) == ("c10d", 1)
        assert args.module and args.training_script == "gpo_trl.recipe"


def test_passthrough_flags_reach_accelerate_and_unknown_ones_are_named():
    argv, passthrough = split_passthrough(["--config", "r.yaml", "--beta", "0.2", "--", "--max_restarts", "2"])
    assert argv == ["--config", "r.yaml", "--beta", "0.2"] and passthrough == ["--max_restarts", "2"]
    args = parse_accelerate_args(passthrough, argv, launch_command_parser())
    assert args.max_restarts == 2 and args.training_script_args == argv
    with pytest.raises(ConfigError, match="no option '--max_restart'"):
        parse_accelerate_args(["--max_restart", "2"], argv, launch_command_parser())


@pytest.mark.slow
def test_sigterm_to_a_multi_process_launcher_exits_3_after_a_checkpoint(tmp_path):
    """What srun delivers on each node: SIGTERM to the `gpo-trl train` launcher alone, here with 2 processes under
    torchrun's agent (cpu_ddp). The ranks checkpoint and exit 3, and so does the launcher, so the sbatch script
    requeues (before, torchrun's own handler made it exit 1 with a traceback)."""
    from conftest import console_script
    from gpo_trl.guards import last_complete_checkpoint

    args = [console_script("gpo-trl"), "train", "--config", RECIPE, "--model_name_or_path", str(tmp_path / "m"),
            "--dataset_name", str(tmp_path / "d"), "--output_dir", str(tmp_path / "run"), "--max_steps", "400",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_before_training", "false",
            "--accelerate_config", "cpu_ddp"]
    process = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = time.time()
    while not (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() - started < 240, "no checkpoint-2"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # the launcher only, not its process group
    _, err = process.communicate(timeout=180)
    assert process.returncode == 3, err[-3000:]
    assert "Training was interrupted by signal 15" in err and "SignalException" not in err
    assert last_complete_checkpoint(str(tmp_path / "run")) is not None
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
