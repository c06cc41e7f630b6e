"""One writer per output folder, for real: the lock is held by every process of a job until it exits (ranks left
running by a killed launcher keep the folder), taken over only when no process of the old job lives, taken by
`kvtrain calibrate` too, and let go by a job that stops on an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvtrain.errors import OutputInUseError
from kvtrain.io import LOCK_FILE, OutputLock
from test_bad_inputs import hold_lock, kvtrain_cli, model_dir  # noqa: F401

REPO = Path(__file__).resolve().parent.parent

# A launcher that starts one rank in a session of its own (as torch's elastic agent may), the rank taking the lock
# as a rank of that launcher's job does, then both sleep.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    rank = ("import time; from kvtrain.io import OutputLock; OutputLock(%r, 'rank 0').acquire(); "
            "print(%r, flush=True); time.sleep(120)") % (sys.argv[1], "rank holds")
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}
    child = subprocess.Popen([sys.executable, "-c", rank], env=env, start_new_session=True, stdout=subprocess.PIPE,
                             text=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    time.sleep(120)
""")


def test_ranks_orphaned_by_a_killed_launcher_keep_the_folder(tmp_path):
    folder = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(folder)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    rank_pid, said = launcher.stdout.readline().split(" ", 1)
    rank = int(rank_pid)
    try:
        assert said.strip() == "rank holds"
        launcher.send_signal(signal.SIGKILL)  # kill -9 of the launcher: its rank runs on
        launcher.wait()
        os.kill(rank, 0)  # still alive
        with pytest.raises(OutputInUseError, match=rf"in use by another job \(pid {launcher.pid} "):
            OutputLock(folder, "next job").acquire()
    finally:
        os.kill(rank, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the rank's exit is what frees the folder
        try:
            os.kill(rank, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    lock = OutputLock(folder, "next job")
    (warning,) = lock.acquire()
    assert "taking over the lock of a job that is no longer running" in warning
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_processes_of_one_job_share_the_lock_and_the_last_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    first, second = OutputLock(tmp_path, "rank 0"), OutputLock(tmp_path, "rank 1")
    assert first.acquire() == [] and second.acquire() == []
    first.release()
    assert (tmp_path / LOCK_FILE).exists()  # the other process of the job still works there
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_calibrate_into_a_folder_another_job_holds_is_refused(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "calib"
    holder = hold_lock(out, "kvtrain calibrate --out first")
    try:
        code, output = kvtrain_cli(["calibrate", "--model", str(model_dir), "--out", str(out), "--fit", "head-budgets",
                                    "--num-blocks", "2", "--block-len", "16", "--no-progress"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"in use by another job (pid {holder.pid}" in output and "--out first" in output, output
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written beside the holder's lock


def test_a_calibration_stopped_by_its_damaged_checkpoint_lets_go(model_dir, tmp_path, capsys):  # noqa: F811
    from kvtrain.calibrate.run import PROGRESS, STATE_DIR, _State

    out = tmp_path / "calib"
    state = out / "kv_compression" / STATE_DIR
    _State(state, {"model_fingerprint": "m"}).save(None, 1)
    progress = state / PROGRESS
    progress.write_text(progress.read_text().replace('"blocks_done": 1', '"blocks_done": 2'))
    damaged = progress.read_bytes()
    code, output = kvtrain_cli(["calibrate", "--model", str(model_dir), "--out", str(out), "--fit", "head-budgets",
                                "--num-blocks", "2", "--block-len", "16", "--no-progress"], capsys)
    assert code == 2 and f"{progress}: its content does not match the sha256" in output, output
    assert progress.read_bytes() == damaged and not (out / LOCK_FILE).exists()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [PROGRESS]
