"""Process-wide CPU settings every tool applies first: thread count and flush-to-zero of denormal floats.

Threads. torch's default thread count ignores other processes: under ``torchrun`` every process
would take every core, and on a machine busy with other jobs the threads wait on each other
(training ran 10x slower than with one thread). SMT siblings share one core's vector units, so a
second thread per core adds little to convolutions. The default here is the physical cores this
process may run on (CPU affinity, and a cgroup CPU
quota when the container has one), shared among the processes of this node under ``torchrun``
(``LOCAL_WORLD_SIZE``), at least 1. An explicit ``OMP_NUM_THREADS`` is respected, except under
``torchrun``, which sets it to 1 for every process unless told otherwise. (The tools also make idle
OpenMP threads sleep, ``OMP_WAIT_POLICY=PASSIVE``, which must happen before torch loads: see
:mod:`detect.cli`.)

Denormals. Some CPUs take ~100x longer per floating-point operation on subnormal numbers
(|x| < 1.2e-38 in float32), and the backward pass of a convolution makes many: on a 2-core
Xeon one training step took 5.7 s to 86 s depending on how many appeared. Flushing them to zero
(FTZ/DAZ) changes results only below 1.2e-38, far below any loss or detection score's precision.
The CPU's flag is per thread and a new thread copies its creator's, so it is set before
``torch`` starts its thread pool: a later call reaches only the calling thread
(:func:`setup_runtime` says so: ``Runtime.flushing`` is False, and ``log`` gets a warning).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

SYS = Path("/sys")
SUBNORMAL_BITS = 0x00400000      # float32 bit pattern of 2**-127 ~ 5.9e-39, a subnormal


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask; all of them where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, *, sys_root: Path | None = None) -> int:
    """Distinct physical cores among ``cpus`` (default: :func:`allowed_cpus`), capped by a cgroup CPU quota.

    SMT siblings share a (package, core) pair in ``/sys/devices/system/cpu/cpuN/topology``; where
    that is unreadable each logical CPU counts as a core.
    """
    cpus = allowed_cpus() if cpus is None else cpus
    sys_root = SYS if sys_root is None else sys_root
    cores = set()
    for cpu in cpus:
        topology = sys_root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        core, package = _read(topology / "core_id"), _read(topology / "physical_package_id")
        cores.add((package, core) if core is not None else ("cpu", cpu))
    count = max(1, len(cores))
    quota = cgroup_cpu_quota(sys_root=sys_root)
    return min(count, quota) if quota else count


def cgroup_cpu_quota(*, sys_root: Path | None = None) -> int | None:
    """CPUs a container's cgroup quota allows (rounded up), or None without a quota.

    cgroup v2 ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``; v1 splits them into
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``.
    """
    sys_root = SYS if sys_root is None else sys_root
    v2 = _read(sys_root / "fs" / "cgroup" / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        quota, period = (parts + [""])[:2]
    else:
        quota = _read(sys_root / "fs" / "cgroup" / "cpu" / "cpu.cfs_quota_us") or ""
        period = _read(sys_root / "fs" / "cgroup" / "cpu" / "cpu.cfs_period_us") or ""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:   # "max", or no file
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def default_threads(env: Mapping[str, str] | None = None, *, cores: int | None = None) -> int:
    """The automatic thread count (``--threads 0`` / ``train.threads: 0``); see the module docstring.

    Args:
        env: the environment (default ``os.environ``).
        cores: physical cores available (default :func:`physical_cores`).
    """
    env = os.environ if env is None else env
    local = _positive_int(env.get("LOCAL_WORLD_SIZE")) or 1
    explicit = _positive_int(env.get("OMP_NUM_THREADS"))
    if explicit and local == 1:
        return explicit
    cores = physical_cores() if cores is None else cores
    return max(1, cores // local)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def set_threads(n: int = 0) -> int:
    """Use ``n`` threads (0: :func:`default_threads`) in torch's and OpenCV's CPU kernels; returns the count."""
    import cv2
    import torch

    n = n if n > 0 else default_threads()
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    return n


def denormals_flushed(threads: int) -> bool:
    """Whether every one of torch's ``threads`` CPU threads flushes denormal float32 values to zero.

    A subnormal float32 times 1 gives 0 under DAZ and itself otherwise; the tensor is large enough
    that each thread of the pool takes a part. The values are made and read as integer bits:
    converting 1e-39 to float32, or comparing a subnormal with 0, is itself flushed on this thread.
    """
    import torch

    bits = torch.full((max(threads, 1) * 65536,), SUBNORMAL_BITS, dtype=torch.int32)
    product = bits.view(torch.float32) * 1.0
    return int(torch.count_nonzero(product.view(torch.int32))) == 0


@dataclass(frozen=True)
class Runtime:
    """What :func:`setup_runtime` applied."""

    threads: int
    flush_denormal: bool       # asked for
    flushing: bool             # in effect on every thread (False on CPUs without FTZ/DAZ, or when asked not to)


def setup_runtime(*, threads: int = 0, flush_denormal: bool = True,
                  log: Callable[[str], None] | None = None) -> Runtime:
    """Apply the process-wide CPU settings: call it first, before any torch work (see the module docstring).

    Args:
        threads: CPU threads for torch and OpenCV; 0: :func:`default_threads`.
        flush_denormal: flush denormal floats to zero (``torch.set_flush_denormal``); False turns it off.
        log: where a warning goes when the setting could not reach every thread (default: nowhere).
    """
    import torch

    # Threads copy their creator's flag when torch's pool starts them (at the first parallel op after this).
    supported = torch.set_flush_denormal(flush_denormal)
    count = set_threads(threads)
    flushing = bool(flush_denormal and supported and denormals_flushed(count))
    if flush_denormal and supported and not flushing and log is not None:
        log("warning: flush-to-zero reached only some CPU threads (torch's thread pool started before "
            "detect.utils.runtime.setup_runtime was called); denormals may slow training")
    return Runtime(threads=count, flush_denormal=flush_denormal, flushing=flushing)


def cpu_flags(*, cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it is unreadable)."""
    text = _read(cpuinfo) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16); elsewhere it is emulated, slowly."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def fast_bf16(flags: set[str] | None = None) -> bool:
    """Whether bfloat16 autocast runs faster than float32 here: native bf16 and torch's AVX-512 (or AMX) kernels.

    ``ATEN_CPU_CAPABILITY=avx2`` (the test suite's pin) makes torch dispatch to AVX2 kernels, which emulate
    bfloat16 even on a CPU that has it.
    """
    import torch

    return native_bf16(flags) and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def autocast_dtype(amp: bool | str, device, *, log: Callable[[str], None] = print, flags: set[str] | None = None):
    """The mixed-precision dtype of ``train.amp`` on ``device``: float16 on CUDA, bfloat16 on the CPU, else None.

    float16 needs loss scaling (a ``GradScaler``: its 5-bit exponent underflows on small gradients);
    bfloat16 keeps float32's exponent, so the CPU path has none. A CPU without AVX512-BF16 or AMX
    emulates bfloat16 arithmetic: ``train.amp`` then runs, but slower than float32 (a tiny Faster R-CNN step:
    5.9 s against 0.65 s on an AVX2-only AMD EPYC, 2026-12-01), and ``log`` is told. ``amp="auto"``
    takes bfloat16 on a CPU only where it is faster (:func:`fast_bf16`), float32 elsewhere, and float16
    on CUDA.
    """
    import torch

    kind = getattr(device, "type", str(device))
    if not amp:
        return None
    if kind == "cuda":
        return torch.float16
    if kind == "cpu":
        if amp == "auto":
            fast = fast_bf16(flags)
            log("train.amp=auto: " + ("bfloat16 autocast (this CPU computes bfloat16 natively)" if fast else
                                      "float32 (this CPU, or torch's kernels here, would emulate bfloat16)"))
            return torch.bfloat16 if fast else None
        if not native_bf16(flags):
            log("train.amp on this CPU: it has no AVX512-BF16/AMX, so bfloat16 is emulated and much slower "
                "than float32 (set train.amp=false)")
        return torch.bfloat16
    log(f"train.amp ignored: mixed precision on '{kind}' is not supported (CUDA: float16, CPU: bfloat16)")
    return None
