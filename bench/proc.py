"""What /proc says (a process's CPU time and memory, the network stack's drops) and this
process's open-files limit."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User plus system time of every thread of `pid` so far."""
    # The command name in parentheses may hold spaces; the fields after it never do.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, field: str) -> float:
    """A kB field of /proc/PID/status (VmRSS now, VmHWM the peak) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no {field}")


def listen_overflows() -> int:
    """Handshake packets this network namespace dropped so far because a listener's accept
    queue was full; each costs its connection a retransmission, 1 s later, then 2 s, 4 s..."""
    names, values = (line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                     if line.startswith("TcpExt:"))
    return int(dict(zip(names, values, strict=True))["ListenOverflows"])


def allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed` if it is lower (the usual
    default is 1024); children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"this needs {needed} open files but the hard limit is {hard}: "
                           "raise it (ulimit -Hn, LimitNOFILE=) or ask for fewer agents or "
                           "connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
