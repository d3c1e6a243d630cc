"""One thread for every torch call of a process that calls torch from several threads.

torch runs its operators with OpenMP, which keeps one team of worker threads for each
thread that calls into torch. GNU OpenMP (torch's on Linux) lets idle workers spin between
operators only while its teams hold no more threads than the machine has cores; past that,
they sleep and wake for every operator. Ray builds an actor on one thread and calls it on
another, so a two-thread scoring actor kept two teams and ran gpt2-small int8 at 60 % of
its speed in one thread (benchmarks/RESULTS.md). Loading and predicting on this thread
keeps one team.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TorchThread:
    """Runs functions on one thread of its own, with ``threads`` torch threads."""

    def __init__(self, threads: int):
        import torch

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spam-gpt-torch")
        self.run(torch.set_num_threads, threads)

    def run(self, function: Callable[..., T], *args, **kwargs) -> T:
        """``function(*args, **kwargs)`` on the thread; its exception is raised here."""
        return self.executor.submit(function, *args, **kwargs).result()
