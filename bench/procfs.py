"""What the kernel says about a process (resident memory, CPU time) and the TCP stack."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


@dataclass(frozen=True)
class CpuMeter:
    """CPU used by a process between ``start()`` and ``share()``, as a share of one core."""

    pid: int
    cpu: float
    wall: float

    @classmethod
    def start(cls, pid: int, now: float) -> CpuMeter:
        return cls(pid, cpu_seconds(pid), now)

    def share(self, now: float) -> float:
        return (cpu_seconds(self.pid) - self.cpu) / (now - self.wall)


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace: connections a full accept queue
    (a listener's backlog) turned away; the client retries after a second or more."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0
