"""How many threads torch computes with: the machine's physical cores this process may run on, less the ones
other processes keep busy.

torch's kernels split each operation over their threads and wait for all of them at its end. A thread whose
core another process holds arrives late at every such wait: with two threads on two cores and one other busy
process, decoding the tiny trained model fell from 292 to 68 tokens/s, and to 203 with one thread (measured on
this project's 2-core machines). So ``auto`` counts the cores others are busy on, sampled from the kernel's
count of runnable tasks, and leaves them out.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from expertflow.errors import ConfigError


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sys_root: str | Path = "/sys/devices/system/cpu") -> int:
    """Distinct cores among ``cpus`` (hyperthreads of one core count once); ``len(cpus)`` when unknown."""
    cores: set[str] = set()
    for cpu in cpus:
        try:
            cores.add(
                (Path(sys_root) / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
            )
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def busy_elsewhere(
    samples: int = 5, interval: float = 0.01, proc: str | Path = "/proc", own_threads: int = 1
) -> int:
    """CPUs that other processes keep busy: the median of the kernel's runnable-task count over a few samples,
    less this process's ``own_threads`` running now (0 when unknown)."""
    counts: list[int] = []
    for i in range(samples):
        try:
            for line in (Path(proc) / "stat").read_text().splitlines():
                if line.startswith("procs_running "):
                    counts.append(int(line.split()[1]))
                    break
        except (OSError, ValueError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    if not counts:
        return 0
    return max(0, round(statistics.median(counts)) - own_threads)


def auto_threads(sys_root: str | Path = "/sys/devices/system/cpu", proc: str | Path = "/proc") -> int:
    """Physical cores this process may use, less those busy elsewhere; at least one."""
    cpus = usable_cpus()
    cores = physical_cores(cpus, sys_root)
    return max(1, min(cores, len(cpus) - busy_elsewhere(proc=proc)))


def set_threads(setting: int | str = "auto") -> int:
    """Set torch's compute threads to ``setting`` (a count, or ``auto``: :func:`auto_threads`); returns the count.
    The CLI does this at start (``--threads``); a library caller decides for its own process."""
    import torch

    if isinstance(setting, str):
        if setting.strip().lower() != "auto":
            try:
                setting = int(setting)
            except ValueError:
                raise ConfigError(f"threads is a count or 'auto', got {setting!r}") from None
        else:
            setting = auto_threads()
    if setting < 1:
        raise ConfigError(f"threads must be >= 1, got {setting}")
    torch.set_num_threads(setting)
    return setting
