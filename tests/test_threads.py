"""Compute threads: the physical cores this process may use, less those other processes keep busy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expertflow.errors import ConfigError
from expertflow.threads import auto_threads, busy_elsewhere, physical_cores, set_threads, usable_cpus


def _fake_proc(tmp_path: Path, running: int) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text(f"cpu  1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    return proc


def test_busy_cpus_are_the_runnable_tasks_besides_this_one(tmp_path: Path) -> None:
    assert busy_elsewhere(samples=2, interval=0, proc=_fake_proc(tmp_path, 3)) == 2
    assert busy_elsewhere(samples=1, proc=tmp_path / "missing") == 0


def test_hyperthreads_of_one_core_count_once(tmp_path: Path) -> None:
    for cpu, siblings in ((0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")):
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(siblings + "\n")
    assert physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert physical_cores([0, 1, 2, 3], tmp_path / "none") == 4  # topology unknown: every CPU counts


def test_auto_leaves_out_the_cores_another_process_keeps_busy() -> None:
    cpus = usable_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    quiet = auto_threads()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = auto_threads()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy <= quiet - 1 or quiet == 1
    assert busy >= 1


def test_set_threads_takes_a_count_or_auto_and_refuses_anything_else() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads("auto") >= 1
        for bad in (0, "many"):
            with pytest.raises(ConfigError, match="threads"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)
