"""CPU process policy: how many torch threads a process takes, how idle OpenMP threads wait, and
that freed tensor memory is reused rather than faulted in again.

One policy, applied in two places:

- :func:`configure_process` runs once at start-up (``apo_cli.main.main``, before anything imports
  torch), and sets three things that are read only once:

  * OpenMP's waiting. The torch CPU wheel runs its parallel regions on GNU OpenMP (libgomp), whose
    idle threads *spin* for a while (``GOMP_SPINCOUNT``, 300 000 turns, a few milliseconds, by
    default) after every region before they sleep. A decoding step is hundreds of small regions, so
    with the default a thread that has nothing to do keeps its core busy between them, and when
    another process wants that core (a second training run, ``apo compare --jobs``, a browser) the
    spinning thread takes its turns while the serial Python work of the step, or the other process,
    waits. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixes that but costs every region a
    futex wake-up; the backward pass and AdamW are thousands of mid-sized regions, and SmolLM2's
    training phase (2 micro-batches of 16 and AdamW) ran ~20 % slower that way. ``GOMP_SPINCOUNT=30000`` (tens of microseconds of
    spinning, then sleep) keeps the quiet speed and still gives a taken core back within a
    fraction of a time slice (``benchmarks/vs_trl.py --contend 1``).
  * ``THP_MEM_ALLOC_ENABLE=1``: torch's CPU allocator asks for transparent huge pages for tensors of
    2 MB and more (one fault per 2 MB instead of 512 when a step's activations are first touched).
  * ``MKL_CBWR=AUTO,STRICT`` on Intel processors (:func:`reproducible_mkl`): MKL's matrix products
    give the same bits with any thread count. On an Intel Xeon with AMX, MKL otherwise splits the
    inner dimension of many products among its threads (a training step with 1 thread and with 2
    differed in the last bits), so a run whose training threads the :class:`ThreadGovernor` changed
    would not repeat. Measured there: no slower (SmolLM2's products, 32 and 240 rows). On an AMD
    EPYC MKL's products were already the same with any count, and MKL is left as it is there.
  * glibc malloc keeps freed memory (:func:`keep_freed_memory`; a call, not a variable, so it is
    made in this process only: each child process makes its own).

  A choice the user made (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``; ``THP_MEM_ALLOC_ENABLE``;
  ``MKL_CBWR``; any of :data:`MALLOC_VARS`) is left alone, and so is everything when torch is
  already imported (a script that imports torch first keeps its settings:
  :func:`configure_process` says so by returning False). None of this changes what is computed,
  only where MKL's products split their sums on Intel processors: one split for every thread count
  (other last bits than MKL's default there).
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
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["available_cores", "configure_process", "cpu_field", "cpu_vendor", "keep_freed_memory", "local_processes",
           "reproducible_mkl", "share_env", "torch_threads", "user_threads", "ThreadGovernor", "SPIN_COUNT",
           "WAIT_POLICY_VARS"]

# the variables a user may set to choose OpenMP's waiting themselves; any of them set: hands off
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# an idle OpenMP thread spins this many turns (tens of microseconds) before it sleeps; libgomp's default is 300 000
SPIN_COUNT = "30000"
# MKL's conditional numerical reproducibility: the same bits with any thread count
MKL_CBWR = "AUTO,STRICT"
# glibc mallopt parameters (malloc.h); keep_freed_memory() sets both to 0 / -1 (see there)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# the glibc variables with which a user chooses malloc's behaviour; any of them set: hands off
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


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


class ThreadGovernor:
    """Intra-op threads that follow the cores other processes leave free.

    With threads chosen once, a second process on one of the cores makes every parallel region wait
    for the thread that is not running (a time slice of milliseconds, each of hundreds of regions a
    step): SmolLM2's step went from 8 s to 42 s beside one busy loop with 2 threads, where 1 thread
    would have had a core of its own. :meth:`update`, called once per step (the CPU backend: before
    each rollout), looks at the interval since its last call: the busy time of the cores of this
    process's affinity mask (``/proc/stat``, steal included: a hypervisor's other guests take cores
    too) less this process's own CPU time is the load of other processes, in cores, and the next
    step gets ``round(cores - load)`` threads, between 1 and ``ceiling``. Two apo processes on the
    same cores each see the other and settle on a share each; when the other load goes, the threads
    come back. Off Linux (no ``/proc/stat``) the count stays at ``ceiling``.

    Only the training phase is governed: its kernels (large matmuls, row-wise softmax, AdamW) give
    the same bits with any thread count (MKL's on Intel under ``MKL_CBWR=AUTO,STRICT``, which
    :func:`configure_process` sets; tests/test_threads.py trains with 1 and with 2 threads and
    compares every metric and weight), while the decoding step's attention kernel does not, so
    sampling keeps the full count (the CPU backend sets it around each rollout)."""

    MIN_INTERVAL_S = 0.5  # shorter intervals are added to the next one (/proc/stat counts 1/100 s)

    def __init__(self, ceiling: int, cpus: set[int] | None = None, stat_path: str = "/proc/stat"):
        self.ceiling = max(1, int(ceiling))
        if cpus is None:
            try:
                cpus = set(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = set(range(os.cpu_count() or 1))
        self.cpus, self.stat_path = cpus, stat_path
        self.threads = self.ceiling
        self.other_load: float | None = None  # cores other processes used in the last interval
        try:
            self._tick = float(os.sysconf("SC_CLK_TCK"))
        except (AttributeError, OSError, ValueError):
            self._tick = 100.0
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(monotonic s, busy s of our cores, this process's CPU s), or None without /proc/stat."""
        try:
            with open(self.stat_path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus):
                continue
            v = [int(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
        t = os.times()
        return time.monotonic(), busy / self._tick, t.user + t.system

    def update(self) -> int:
        """The thread count for the next step (see the class docstring)."""
        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] < self.MIN_INTERVAL_S:
            return self.threads
        wall = now[0] - self._last[0]
        self.other_load = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        self.threads = max(1, min(self.ceiling, int(len(self.cpus) - self.other_load + 0.5)))
        return self.threads


def configure_process(env: MutableMapping[str, str] | None = None) -> bool:
    """Set OpenMP's waiting and the allocators' policy for this process (and its children) before
    torch loads libgomp; see the module docstring.

    Returns whether the wait policy was set here: False when the user chose one (see
    WAIT_POLICY_VARS) or torch is already imported (libgomp has read its environment; changing it
    now does nothing). The allocator settings follow the same rule, each on its own variable."""
    env = os.environ if env is None else env
    if "torch" in sys.modules:
        return False
    if env is os.environ:
        keep_freed_memory()
    return _set_env_policy(env)


def _set_env_policy(env: MutableMapping[str, str]) -> bool:
    """The policy's variables in ``env`` (huge pages; MKL's reproducibility on Intel; the spin
    count), each unless the user chose; whether the wait policy was set."""
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    reproducible_mkl(env)
    if any(v in env for v in WAIT_POLICY_VARS):
        return False
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def cpu_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first processor's ``name`` line of ``/proc/cpuinfo`` ("vendor_id", "flags", ...), "" where
    there is none (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's vendor ("GenuineIntel", "AuthenticAMD", ...), "" where unknown (not Linux)."""
    return cpu_field("vendor_id", cpuinfo)


def reproducible_mkl(env: MutableMapping[str, str]) -> None:
    """``MKL_CBWR=AUTO,STRICT`` in ``env`` on an Intel processor, unless ``MKL_CBWR`` is set (see the
    module docstring). MKL reads it once, at its first call: set it before torch computes anything.
    The test suite sets it the same way (tests/conftest.py), so its runs in-process and those of
    ``apo`` subprocesses give the same bits."""
    if "MKL_CBWR" not in env and cpu_vendor() == "GenuineIntel":
        env["MKL_CBWR"] = MKL_CBWR


def keep_freed_memory() -> bool:
    """glibc malloc: serve every block from the heap, and never hand freed memory back to the kernel.

    By default glibc gives each block over its mmap threshold (adaptive, at most 32 MiB) a mapping
    of its own and unmaps it when it is freed, and it returns the free top of the heap to the
    kernel past 128 KiB; the next step's tensors of the same sizes are then faulted in and zeroed
    page by page again. A step of SmolLM2 frees and takes back gigabytes (logits of 50 MB, a
    113 MB embedding gradient, the activations): ~400 000 page faults and 1.5-2.8 s of system time
    a step by default, still 15 000-130 000 faults and 0.2-1.1 s with only the threshold raised.
    With ``M_MMAP_MAX = 0`` (no mmap for blocks) and ``M_TRIM_THRESHOLD = -1`` (no trimming) a
    step reuses what the last one freed: from the third step on, about no faults. The process's
    peak resident memory is the same (a freed block is reused, not added to); it stays at that
    peak until the process ends, as a GPU caching allocator does. ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` set by the user: left to
    glibc, which reads them itself. Returns whether the settings were applied (False off glibc)."""
    if any(v in os.environ for v in MALLOC_VARS):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok


def share_env(jobs: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for each of ``jobs`` processes sharing this process's cores: ``OMP_NUM_THREADS``
    = cores // jobs (at least 1) unless the user set it, and :func:`configure_process`'s OpenMP and
    torch-allocator settings unless the user chose their own (glibc's is set by each process)."""
    out = dict(os.environ if env is None else env)
    if user_threads(out) is None:
        out["OMP_NUM_THREADS"] = str(max(1, available_cores() // max(1, jobs)))
    _set_env_policy(out)
    return out
