"""A memory cgroup per sandbox: one limit on everything the sandbox holds, where RLIMIT_AS sees only each
process's address space (not memfds, tmpfs pages or shared memory, and not the sum over processes).

Parent side only (the launcher just writes its pid into ``procs_file``). Used where this machine lets us
create a child of our own memory cgroup: cgroup v1's memory hierarchy (as root, typically), or cgroup v2
where our cgroup delegates the memory controller. Elsewhere `create` returns None and the sandbox keeps
its per-process limits (SANDBOX_GUARANTEES says so).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
import uuid


@dataclasses.dataclass(frozen=True)
class _Hierarchy:
    directory: str  # our own cgroup's directory
    version: int  # 1 or 2


@functools.lru_cache(maxsize=1)
def _our_hierarchy() -> _Hierarchy | None:
    """Our memory cgroup's directory, from /proc/self/cgroup and /proc/self/mountinfo."""
    try:
        with open("/proc/self/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for version in (1, 2):
        for _, controllers, path in memberships:
            if (version == 1 and "memory" not in controllers.split(",")) or (version == 2 and controllers):
                continue
            for fields in mounts:
                separator = fields.index("-")
                fstype, options = fields[separator + 1], fields[separator + 3].split(",")
                root, mountpoint = fields[3], fields[4]
                if (version == 1 and fstype == "cgroup" and "memory" in options) or (
                        version == 2 and fstype == "cgroup2"):
                    relative = os.path.relpath(path, root)
                    if not relative.startswith(".."):
                        directory = os.path.normpath(os.path.join(mountpoint, relative))
                        if os.path.isdir(directory):
                            return _Hierarchy(directory, version)
    return None


class MemoryCgroup:
    """A child cgroup of ours with a memory limit (swap included where the kernel accounts it)."""

    def __init__(self, directory: str, version: int):
        self.directory, self.version = directory, version

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup | None:
        """A new cgroup limited to `limit_bytes`, or None where this machine does not let us make one."""
        hierarchy = _our_hierarchy()
        if hierarchy is None:
            return None
        directory = os.path.join(hierarchy.directory, f"trd-sandbox-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(directory)
        except OSError:
            return None
        group = cls(directory, hierarchy.version)
        try:
            if hierarchy.version == 1:
                group._write("memory.limit_in_bytes", limit_bytes)
                if os.path.exists(os.path.join(directory, "memory.memsw.limit_in_bytes")):
                    group._write("memory.memsw.limit_in_bytes", limit_bytes)
            else:
                group._write("memory.max", limit_bytes)
                if os.path.exists(os.path.join(directory, "memory.swap.max")):
                    group._write("memory.swap.max", 0)
        except OSError:  # no memory controller in this (v2) cgroup, or not ours to configure
            group.remove()
            return None
        if not os.access(group.procs_file, os.W_OK):  # the launcher could not join it: no limit at all
            group.remove()
            return None
        return group

    @property
    def procs_file(self) -> str:
        return os.path.join(self.directory, "cgroup.procs")

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(str(value))

    def _read_counters(self, name: str) -> dict[str, int]:
        try:
            with open(os.path.join(self.directory, name)) as f:
                return {key: int(value) for key, value in (line.split() for line in f if len(line.split()) == 2)}
        except (OSError, ValueError):
            return {}

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for reaching the limit."""
        counters = self._read_counters("memory.oom_control" if self.version == 1 else "memory.events")
        return counters.get("oom_kill", 0) > 0

    def peak_bytes(self) -> int | None:
        try:
            with open(os.path.join(self.directory, "memory.max_usage_in_bytes" if self.version == 1
                                   else "memory.peak")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """Kill what is left in the group and delete it (a group with processes cannot be deleted)."""
        for _ in range(100):
            try:
                with open(self.procs_file) as f:
                    pids = [int(line) for line in f if line.strip()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.rmdir(self.directory)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)  # dying processes leave the group a moment after SIGKILL
