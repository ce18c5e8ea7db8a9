"""Peak memory of a stretch of work (an epoch, a benchmark row): reset, work, read."""

from __future__ import annotations

import resource

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or on Linux the process's RSS high-water mark
    (writing 5 to /proc/self/clear_refs), so each row of a matrix reports its own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process
        pass


def peak_memory_mb(device: torch.device) -> float:
    """MiB at the peak since the last reset: allocated tensors on CUDA, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
