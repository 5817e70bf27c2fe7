"""The peak RSS of this process's own program, for the test children that report their memory.

Note [a child's peak RSS]: ``getrusage(RUSAGE_SELF).ru_maxrss`` is not it. Linux keeps a process's maximum RSS
in its signal struct, which a fork copies from the parent and an exec keeps, so a child started by a pytest
process of 900 MB reports at least 900 MB whatever it used itself (seen: two children of different sizes
reporting the same byte count, in a full run only). The memory map's high-water mark, ``VmHWM`` in
/proc/self/status, starts with the new program at the exec.
"""

from __future__ import annotations


def own_peak_rss() -> int:
    """Bytes: the highest RSS of this process since its program started (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")
