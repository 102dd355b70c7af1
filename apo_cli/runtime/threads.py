"""CPU thread policy: how many torch threads a process takes, and that idle OpenMP threads sleep.

One policy, applied in two places:

- :func:`configure_process` runs once at start-up (``apo_cli.main.main``, before anything imports
  torch). The torch CPU wheel runs its parallel regions on GNU OpenMP (libgomp), whose idle threads
  *spin* for a while (``GOMP_SPINCOUNT``, 300 000 turns by default) after every region before they
  sleep. A decoding step is hundreds of small regions, so between them a thread that has nothing
  to do keeps its core busy: when another process wants that core (a second training run, ``apo
  compare --jobs``, a browser), the spinning thread takes its turns and the serial Python work of
  the step, or the other process, waits. libgomp reads its settings once, when it is loaded with
  torch, so they are set in the environment here, first: ``OMP_WAIT_POLICY=PASSIVE`` (an idle
  thread sleeps at once; libgomp's spin count becomes 0). A wait policy or spin count the user set
  (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is left alone, and so is everything when torch is
  already imported (a script that imports torch first keeps its settings: :func:`configure_process`
  says so by returning False).
- :func:`torch_threads` is what the CPU backend passes to ``torch.set_num_threads``: the recipe's
  ``backend.threads`` when set; else an explicit ``OMP_NUM_THREADS`` the user gave (``apo compare
  --jobs`` sets it for each of its processes); else the cores this process may run on
  (``os.sched_getaffinity``: ``taskset``, cgroup cpusets, ``docker --cpuset-cpus``, Slurm; not
  ``os.cpu_count()``, which counts the whole machine), shared out among the processes of this node
  (``LOCAL_WORLD_SIZE`` under torchrun), at least one each.

:func:`share_env` is the same rule for a parent that starts ``jobs`` processes of its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

__all__ = ["available_cores", "configure_process", "local_processes", "share_env", "torch_threads",
           "user_threads", "WAIT_POLICY_VARS"]

# the variables a user may set to choose OpenMP's waiting themselves; any of them set: hands off
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_processes(env: Mapping[str, str] | None = None) -> int:
    """Training processes sharing this node's cores: ``LOCAL_WORLD_SIZE`` under torchrun, else 1."""
    env = os.environ if env is None else env
    try:
        if int(env.get("WORLD_SIZE", "1")) <= 1:  # one process (what World.from_env calls not distributed)
            return 1
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def user_threads(env: Mapping[str, str] | None = None) -> int | None:
    """The thread count in ``OMP_NUM_THREADS`` (its first entry, as OpenMP reads a list), or None
    when it is unset or not a positive integer."""
    env = os.environ if env is None else env
    raw = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def torch_threads(requested: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for this process: ``requested`` (``backend.threads``), else ``OMP_NUM_THREADS``,
    else the affinity mask's cores // the node's processes (at least 1)."""
    if requested:
        return int(requested)
    explicit = user_threads(env)
    if explicit is not None:
        return explicit
    return max(1, available_cores() // local_processes(env))


def configure_process(env: MutableMapping[str, str] | None = None) -> bool:
    """Set OpenMP's wait policy for this process (and its children) before torch loads libgomp.

    Returns whether the policy was set here: False when the user chose one (see WAIT_POLICY_VARS)
    or torch is already imported (libgomp has read its environment; changing it now does nothing)."""
    env = os.environ if env is None else env
    if any(v in env for v in WAIT_POLICY_VARS) or "torch" in sys.modules:
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def share_env(jobs: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for each of ``jobs`` processes sharing this process's cores: ``OMP_NUM_THREADS``
    = cores // jobs (at least 1) unless the user set it, and the passive wait policy unless the user
    chose one."""
    out = dict(os.environ if env is None else env)
    if user_threads(out) is None:
        out["OMP_NUM_THREADS"] = str(max(1, available_cores() // max(1, jobs)))
    if not any(v in out for v in WAIT_POLICY_VARS):
        out["OMP_WAIT_POLICY"] = "PASSIVE"
    return out
