"""A local Ray leaves none of its processes behind, even one stuck in its own exit, and
runs its workers at the priority of the command that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from spam_gpt.ray_cluster import (
    BLOCK_FETCH_THREAD,
    let_block_fetches_finish,
    raylet_pids,
    shutdown_local_ray,
    workers_of,
)

# A process that outlives a polite stop, as a Ray worker deadlocked in its exit handlers does.
STUCK = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
GONE_RAYLET = 2**22 + 12345  # above Linux's default pid_max: no such raylet


def test_ray_shuts_down_after_the_block_fetches_in_hand_and_waits_no_longer():
    """A fetch that touches Ray after its shutdown ends the process with exit code 1."""
    finishing = threading.Thread(target=time.sleep, args=(0.5,), name=BLOCK_FETCH_THREAD)
    stuck = threading.Event()
    parked = threading.Thread(target=stuck.wait, name=BLOCK_FETCH_THREAD, daemon=True)
    for thread in (finishing, parked):
        thread.start()
    started = time.monotonic()
    let_block_fetches_finish(timeout_s=2.0)
    waited = time.monotonic() - started
    assert not finishing.is_alive()
    assert parked.is_alive() and 1.9 <= waited < 5  # a stuck one holds the exit 2 s at most
    stuck.set()


def test_a_worker_that_outlives_its_ray_is_killed_after_the_grace_period():
    env = {**os.environ, "RAY_RAYLET_PID": str(GONE_RAYLET)}
    stuck = subprocess.Popen([sys.executable, "-c", STUCK], env=env)
    bystander = subprocess.Popen([sys.executable, "-c", STUCK])
    try:
        assert workers_of({GONE_RAYLET}) == [stuck.pid]
        assert shutdown_local_ray({GONE_RAYLET}, grace_s=0.5) == [stuck.pid]
        assert stuck.wait(timeout=10) == -9
        assert bystander.poll() is None  # another raylet's, or nobody's: left alone
    finally:
        stuck.kill()
        bystander.kill()


def test_no_raylet_is_counted_before_ray_starts():
    assert raylet_pids() == set()


# A command's process: a local Ray with an actor, then the end of the process.
COMMAND = """
import os
import ray
from spam_gpt.ray_cluster import connect, raylet_pids, workers_of

connect(num_cpus=1)
actor = ray.remote(num_cpus=0)(type("Idle", (), {"nice": lambda self: os.nice(0)}))
handle = actor.remote()
worker_nice = ray.get(handle.nice.remote())
(raylet,) = raylet_pids()
print(raylet, len(workers_of({raylet})), os.nice(0), worker_nice, flush=True)
"""


def test_a_command_that_started_ray_runs_its_workers_at_its_priority_and_leaves_none():
    """Run at nice 5: Ray's default would put its workers at 5 + 15."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", COMMAND],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.nice(5),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    raylet, workers, command_nice, worker_nice = map(int, done.stdout.split()[-4:])
    assert workers >= 1  # the actor's process, at least, was counted while Ray ran
    assert workers_of({raylet}) == []
    assert command_nice >= 5
    assert worker_nice == command_nice  # the command's priority, not Ray's nice 15
