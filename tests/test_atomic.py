"""gpo_trl.atomic: an output folder is replaced as a whole. A crash injected before each file operation, in turn,
leaves the previous complete output or the new one (never a mix, never a missing file once the next writer ran),
and the same write then succeeds with no manual cleanup. One real `kill -9` of a process in the middle of a write."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from gpo_trl.atomic import (MARKER, SimulatedCrash, check_output_dir, inject_fault, read_marker, recover,
                            replace_dir, write_text_atomic)
from gpo_trl.errors import OutputExistsError

OLD = {"config.json": "old config", "model.safetensors": "old weights", "sub/part.bin": "old part"}
NEW = {"config.json": "new config", "model.safetensors": "new weights", "extra.txt": "new extra"}


def write_output(final, files, **kwargs):
    with replace_dir(final, "test", **kwargs) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def content(final) -> dict | None:
    """The output's files (marker aside), or None when the folder is missing."""
    if not final.exists():
        return None
    return {str(p.relative_to(final)): p.read_text() for p in sorted(final.rglob("*"))
            if p.is_file() and p.name != MARKER}


def siblings(final):
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


def test_a_crash_before_any_file_operation_leaves_old_or_new_and_a_rerun_finishes(tmp_path):
    final = tmp_path / "out"
    write_output(final, OLD)
    with inject_fault() as labels:
        write_output(final, NEW)
    assert content(final) == NEW and siblings(final) == []
    operations = list(labels)
    assert {"swap 1: final -> backup", "swap 2: staging -> final", "remove backup", "unlock"} <= set(operations)
    seen = set()
    for n in range(1, len(operations) + 1):
        write_output(final, OLD, overwrite=True)
        with inject_fault(at=n), pytest.raises(SimulatedCrash):
            write_output(final, NEW)
        state = content(final)
        # Between the two swaps the folder is missing; anything else is the old or the new output, whole.
        assert state in (OLD, NEW) or (state is None and operations[n - 1] == "swap 2: staging -> final"), n
        if state is None:
            recover(final)  # what the next writer does first
            assert content(final) == OLD
        seen.add("old" if content(final) == OLD else "new")
        write_output(final, NEW)  # the same command again: no cleanup by hand
        assert content(final) == NEW and siblings(final) == [], (n, siblings(final))
        assert read_marker(final)["files"] == sorted(["config.json", "extra.txt", "model.safetensors"])
    assert seen == {"old", "new"}  # the loop did cross the commit point


def test_a_crash_while_recovering_is_recovered_too(tmp_path):
    final = tmp_path / "out"
    write_output(final, OLD)
    with inject_fault() as labels:  # count the operations first
        write_output(final, NEW, overwrite=True)
    swap2 = labels.index("swap 2: staging -> final") + 1
    write_output(final, OLD, overwrite=True)
    with inject_fault(at=swap2), pytest.raises(SimulatedCrash):
        write_output(final, NEW)
    assert not final.exists()
    with inject_fault(at=2), pytest.raises(SimulatedCrash):  # 1: nothing; 2: the restore rename itself
        recover(final)
    recover(final)
    assert content(final) == OLD
    write_output(final, NEW)
    assert content(final) == NEW and siblings(final) == []


def test_an_error_in_the_block_keeps_the_previous_output(tmp_path):
    final = tmp_path / "out"
    write_output(final, OLD)
    with pytest.raises(RuntimeError):
        with replace_dir(final, "test") as staging:
            (staging / "config.json").write_text("half")
            raise RuntimeError("disk full")
    assert content(final) == OLD and siblings(final) == []


def test_the_users_files_are_never_replaced_without_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my numbers")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds files gpo-trl did not write there \(notes.txt, summary.json\)"
                       r".*`--overwrite`"):
        write_output(mine, NEW)
    assert (mine / "summary.json").read_text() == "my numbers"
    ours = tmp_path / "ours"
    write_output(ours, OLD)
    (ours / "added-by-me.txt").write_text("mine")  # a file the user put into gpo-trl's folder
    with pytest.raises(OutputExistsError, match="added-by-me.txt"):
        write_output(ours, NEW)
    write_output(ours, NEW, overwrite=True)
    assert content(ours) == NEW
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "afile", overwrite=True)


def test_carried_entries_are_kept_as_hard_links(tmp_path):
    final = tmp_path / "run"
    write_output(final, {"adapter.bin": "old"})
    (final / "checkpoint-2").mkdir()
    (final / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with replace_dir(final, "train", strict=False, carry=lambda name: name.startswith("checkpoint-")) as staging:
        (staging / "adapter.bin").write_text("new")
    assert content(final) == {"adapter.bin": "new", "checkpoint-2/trainer_state.json": "{}"}
    assert read_marker(final)["files"] == ["adapter.bin"]


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_a_live_one_refused(tmp_path):
    final = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".out.gpo-lock"
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 1.0}))
    write_output(final, NEW)
    assert content(final) == NEW and not lock.exists()
    from gpo_trl.atomic import _process_identity

    alive = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid,
                                    "started": _process_identity(alive.pid)}))
        with pytest.raises(OutputExistsError, match=f"being written by another gpo-trl process \\(pid {alive.pid}"):
            write_output(final, OLD, overwrite=True)
    finally:
        alive.kill()
        alive.wait()
    write_output(final, OLD, overwrite=True)  # that process is gone now: its lock is taken over
    assert content(final) == OLD


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    write_text_atomic(tmp_path / "a" / "x.json", "1")
    with inject_fault(at=2), pytest.raises(SimulatedCrash):  # killed before the rename: the old file stays
        write_text_atomic(tmp_path / "a" / "x.json", "2")
    assert (tmp_path / "a" / "x.json").read_text() == "1"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "a" / f".x.json.tmp-{int(dead.stdout)}").write_text("half")  # a killed process's
    write_text_atomic(tmp_path / "a" / "x.json", "2")
    assert (tmp_path / "a" / "x.json").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]


WRITER = """
import sys, time
from pathlib import Path
from gpo_trl.atomic import replace_dir
with replace_dir(Path(sys.argv[1]), "test", overwrite=True) as staging:
    for i in range(400):
        (staging / f"part-{i:03d}.bin").write_bytes(sys.argv[2].encode() * 2000)
        if i == 5:
            print("writing", flush=True)
        time.sleep(0.005)
"""


def test_a_real_sigkill_mid_write_keeps_the_old_output_and_the_rerun_finishes(tmp_path):
    final = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", WRITER, str(final), "a"], env=env, check=True)
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(final), "b"], env=env, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "writing\n"
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    files = content(final)
    assert len(files) == 400 and set(files.values()) == {"a" * 2000}  # the old output, whole
    assert any(".gpo-new-" in name for name in siblings(final))  # the killed build is still there
    subprocess.run([sys.executable, "-c", WRITER, str(final), "b"], env=env, check=True)
    assert set(content(final).values()) == {"b" * 2000} and siblings(final) == []


# --- A training run's final save ----------------------------------------------------------------------------------


def top_level(folder) -> dict | None:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.exists() else None


def test_a_final_save_killed_at_any_file_operation_keeps_checkpoints_and_old_or_new_model(tmp_path):
    """The final adapter, card and gpo_run.json are replaced as a whole; the checkpoints and a file of the user's in
    output_dir survive every crash (hard-linked into the new folder). Old and new saves differ in their weights."""
    import torch

    from gpo_trl.guards import last_complete_checkpoint
    from gpo_trl.recipe import main as recipe_main, prepare_output_dir, save_final
    from test_pipeline import demo_args

    trainer, before, after = recipe_main(*demo_args(tmp_path, "--max_steps", "2", "--save_strategy", "steps",
                                                    "--save_steps", "2"))
    out = tmp_path / "out"
    record = json.loads((out / "gpo_run.json").read_text())
    assert record["base_model"]["name_or_path"] == str(tmp_path / "assets" / "model")
    assert len(record["base_model"]["embedding_sample"]) == 32
    (out / "notes.txt").write_text("mine")
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    original = [p.detach().clone() for p in lora_b]

    def save(shift: float):
        with torch.no_grad():
            for p, value in zip(lora_b, original):
                p.copy_(value + shift)
        save_final(trainer, str(out), before, after)

    save(1.0)
    new = top_level(out)
    save(0.0)
    old = top_level(out)
    assert old["adapter_model.safetensors"] != new["adapter_model.safetensors"]
    with inject_fault() as labels:
        save(1.0)
    outcomes = []
    for n in range(1, len(labels) + 1):
        save(0.0)
        with inject_fault(at=n), pytest.raises(SimulatedCrash):
            save(1.0)
        state = top_level(out)
        assert state in (old, new) or (state is None and labels[n - 1].startswith("swap 2")), labels[n - 1]
        outcomes.append("old" if state == old else "new" if state == new else "missing")
        if state is None:  # what the rerun of `gpo-trl train ... --resume_from_checkpoint last` does first
            prepare_output_dir(str(out), overwrite=False)
            assert top_level(out) == old
        assert last_complete_checkpoint(str(out)).endswith("checkpoint-2") and (out / "notes.txt").read_text() == "mine"
        save(1.0)
        assert top_level(out) == new and siblings(out) == ["assets"]
    assert {"old", "new", "missing"} == set(outcomes) and "link checkpoint-2" in labels, (labels, outcomes)


def test_training_refuses_an_output_dir_it_did_not_create(tmp_path):
    from gpo_trl.recipe import main as recipe_main
    from test_pipeline import demo_args

    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"`output_dir` .* holds files gpo-trl did not write there "
                       r"\(thesis.tex\).*`--overwrite_output_dir true`"):
        recipe_main(*demo_args(tmp_path))
    assert (mine / "thesis.tex").read_text() == "mine"


RACER = """
import json, os, sys, time
from pathlib import Path
from gpo_trl.atomic import directory_lock, OutputExistsError
final, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:  # all racers read the stale lock at once
    pass
held = 0
while time.time() < start + 2:
    try:
        with directory_lock(final):
            fd = os.open(final.parent / "holder", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # two holders: FileExistsError
            time.sleep(0.01)
            os.close(fd)
            os.unlink(final.parent / "holder")
            held += 1
    except OutputExistsError:
        time.sleep(0.001)
print(held)
"""


def test_racing_writers_never_hold_the_lock_together(tmp_path):
    """Eight processes race for one output whose lock a dead process left, then for the lock each other hold, for
    2 s: never two holders at once (the inner file is created exclusively), and every lock is released. Before,
    racers that all judged the dead lock stale each deleted it, and one could delete another's fresh lock."""
    import socket

    final = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".out.gpo-lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                        "started": 1.0}))
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    start = time.time() + 3  # after the interpreters have started
    racers = [subprocess.Popen([sys.executable, str(script), str(final), str(start)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [racer.communicate(timeout=120) for racer in racers]
    for racer, (out, err) in zip(racers, results):
        assert racer.returncode == 0, err[-2000:]
    assert sum(int(out) for out, _ in results) >= 8  # they did take turns (190 holds here)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.gpo-lock")] == []
