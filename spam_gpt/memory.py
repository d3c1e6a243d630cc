"""How much memory a process holds, for runs that report what their data cost.

``ru_maxrss`` (the peak resident set) also counts shared pages a process maps, such as
blocks of Ray's object store that a Ray Train worker reads: the more data streams past,
the more of the store's pages it has touched, though it holds none of them. The private
(anonymous) memory is what the process itself keeps; Linux reports it as ``RssAnon`` and
keeps no peak of it, so :class:`PeakMemory` samples it.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable, Iterable
from pathlib import Path


def private_mb(pid: int | str = "self") -> float | None:
    """Anonymous resident memory of a process in MiB (Linux), else None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Samples private memory every ``interval`` seconds on a daemon thread: of this
    process, or of the largest of the processes ``pids`` names at each sample."""

    def __init__(
        self, interval: float = 0.2, pids: Callable[[], Iterable[int | str]] = lambda: ["self"]
    ):
        self.pids = pids
        self.peak = self.sample()
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.sample())

    def sample(self) -> float:
        return max((private_mb(pid) or 0.0 for pid in self.pids()), default=0.0)

    def stop(self) -> float:
        """Stop sampling; the peak private memory in MiB (0 where it cannot be read)."""
        self.stopped.set()
        self.thread.join()
        self.peak = max(self.peak, self.sample())
        return self.peak
