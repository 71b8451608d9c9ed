"""How much memory this host still has for us: what the kernel reports as available, bounded by a
container's cgroup limit (where its OOM killer acts first)."""

from __future__ import annotations

from pathlib import Path


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, bounded by the room left under a cgroup memory limit (the limit
    a container's OOM killer enforces); psutil's figure where there is no /proc (when installed)."""
    room = [value for value in (_meminfo_available(), _cgroup_room()) if value is not None]
    if room:
        return min(room)
    try:
        import psutil  # optional: not a dependency
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_room() -> int | None:
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - int(usage))
    return None
