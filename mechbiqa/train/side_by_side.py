"""Run independent jobs side by side on a CPU: one process each, the threads shared out.

A compact training step is hundreds of small products and elementwise kernels, and two
threads on one step scale poorly: the 8-layer compact step takes about 0.8 s on two
threads and 1.4 s on one. Two checkpoints trained at once, one thread each, therefore
finish a pair sooner than one after the other with both threads
(``studies/bench_side_by_side.py`` times the two arrangements on the same runs).

Each job is a top-level function run in a fresh (``spawn``) process, which imports the
calling script again: a script that calls `run_side_by_side` (or ``train_pair``) keeps its
top-level work under ``if __name__ == "__main__":``, as every script in ``studies/`` does. Its progress events
come back over a queue and are handed to the caller's callback in this process, so a
display sees them as from one run. Faults stay legible:

- Ctrl-C reaches this process only (each job leads its own process group), which passes
  it on once to every job: a training loop then finishes its step, writes its checkpoint
  and stops; `run_side_by_side` waits for all of them and raises one `KeyboardInterrupt`
  naming each job's state. A second Ctrl-C is passed on too (stop at once).
- A job's exception is raised here, as it was raised there, after the other jobs end
  (their work is kept: a rerun resumes each from its last checkpoint).
- When one job ends, the others share its threads from their next step on: a long
  one-stage run is not left on one thread once the shorter two-stage run is done.
- A job process that dies without a word (killed, out of memory) is named with its exit
  code; a job dies with this process (Linux), so a killed run leaves nothing training.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "available_memory", "run_jobs", "run_side_by_side", "worth_it"]


@dataclass(frozen=True)
class Job:
    """One side of the run.

    Attributes:
        name: What the job is called in messages (``one-stage``).
        fn: A top-level function ``fn(*args, progress=callback)`` whose return value is picklable.
        args: Its positional arguments (picklable).
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


def available_memory() -> int:
    """Bytes of memory a new process may take: ``MemAvailable`` where ``/proc/meminfo`` has it (Linux),
    else the free physical pages."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def worth_it(device: str, threads: int, jobs: int, each_bytes: int = 0) -> bool:
    """Whether ``jobs`` independent jobs are better run side by side: on a CPU (``cpu``, or ``auto`` without
    CUDA), in a process not launched as one of several (``torchrun``), with two threads or more and two jobs
    or more, and when the jobs running together (one per thread), ``each_bytes`` each (e.g. a checkpoint's
    weights), take at most half the available memory: two 7B checkpoints in bf16 (16 GB each) run one after
    the other on a 24 GB machine. A GPU runs one job at a time."""
    import torch

    from mechbiqa.train.distributed import launched

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not (on_cpu and not launched() and threads >= 2 and jobs >= 2):
        return False
    return each_bytes * min(jobs, threads) <= available_memory() // 2


def _die_with_parent() -> None:
    """Ask the kernel to end this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker(job: Job, threads: int, running: Any, events: Any) -> None:
    """The job's process: its own process group, its share of ``threads`` (taken again at each event, so the
    last job running has them all), events and the outcome on ``events``."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes it on once
    _die_with_parent()
    import torch

    def share() -> int:
        return max(1, threads // max(1, running.value))

    torch.set_num_threads(share())

    def report(event: Any) -> None:
        events.put(("event", job.name, event))
        if torch.get_num_threads() != share():  # a job ended: take its threads (between steps)
            torch.set_num_threads(share())

    try:
        value = job.fn(*job.args, progress=report)
    except BaseException as error:  # noqa: BLE001  (every outcome goes back, KeyboardInterrupt included)
        try:
            events.put(("error", job.name, error))
        except Exception:  # an exception that does not pickle goes back as its words  # noqa: BLE001
            events.put(("error", job.name, RuntimeError(f"{type(error).__name__}: {error}")))
        return
    events.put(("done", job.name, value))


@contextlib.contextmanager
def _forward_interrupts(processes: list[Any]) -> Iterator[list[int]]:
    """While the jobs run, pass each SIGINT this process gets on to every live job; yield the count."""
    came: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        came.append(signum)
        for p in processes:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)

    before = signal.signal(signal.SIGINT, handler)
    try:
        yield came
    finally:
        signal.signal(signal.SIGINT, before)


def run_side_by_side(jobs: list[Job], threads: int, progress: Callable[[Any], None] | None = None,
                     at_once: int | None = None) -> Mapping[str, Any]:
    """Run ``jobs`` side by side, each in its own process with an equal share of ``threads`` (at least 1).

    At most ``at_once`` run together; the next job (in list order) starts when one ends. The running jobs
    share the threads, taken again at each progress event, so a job left alone runs on every thread.

    Args:
        jobs: The jobs (distinct names).
        threads: The threads to share out.
        progress: Called here with every event a job reports, in arrival order.
        at_once: The most jobs running together (None: all of them).

    Returns:
        Job name -> the job's return value.

    Raises:
        KeyboardInterrupt: Ctrl-C came; no further job starts, and the message joins each interrupted job's
            own and names the jobs not started.
        BaseException: The first failed job's exception (in job order), once every running job has ended
            (no further job starts after a failure).
        RuntimeError: A job process died without reporting (its name and exit code).
    """
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must differ: {names}")
    at_once = len(jobs) if at_once is None else max(1, at_once)
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    running = ctx.Value("i", 0)
    queued, started = list(jobs), {}  # job name -> (job, process)
    processes: list[Any] = []  # what Ctrl-C is passed on to (the started ones)
    outcomes: dict[str, tuple[str, Any]] = {}
    silent: set[str] = set()  # found dead with the queue empty once; dead for good when found so again

    def end(name: str, kind: str, payload: Any) -> None:
        outcomes[name] = (kind, payload)
        with running.get_lock():
            running.value = len(started) - len(outcomes)

    with _forward_interrupts(processes) as interrupted:
        while True:
            halted = interrupted or any(kind == "error" for kind, _ in outcomes.values())
            while queued and not halted and len(started) - len(outcomes) < at_once:
                job = queued.pop(0)
                with running.get_lock():  # before it starts, so it takes its share at once
                    running.value = len(started) - len(outcomes) + 1
                p = ctx.Process(target=_worker, args=(job, threads, running, events),
                                name=f"mechbiqa-{job.name}", daemon=True)
                started[job.name] = (job, p)
                p.start()
                processes.append(p)
            if len(outcomes) == len(started) and (halted or not queued):
                break
            try:
                kind, name, payload = events.get(timeout=0.5)
            except queue.Empty:
                for name, (job, p) in started.items():
                    if name not in outcomes and not p.is_alive():
                        if name not in silent:  # its last words may still be in the pipe
                            silent.add(name)
                            continue
                        p.join()
                        end(name, "error", RuntimeError(
                            f"the {name} process ended without a result (exit code {p.exitcode}); "
                            "rerun the same command to resume it from its last checkpoint"))
                continue
            if kind == "event":
                if progress is not None:
                    progress(payload)
            else:
                end(name, kind, payload)
        for p in processes:
            p.join()
    errors = [(name, outcomes[name][1]) for name in names if outcomes.get(name, ("",))[0] == "error"]
    stopped = [(name, e) for name, e in errors if isinstance(e, KeyboardInterrupt)]
    if stopped or (interrupted and errors) or (interrupted and queued):
        said = "; ".join(f"{name}: {e}" if str(e) else f"{name}: interrupted" for name, e in stopped)
        if queued:
            said += ("; " if said else "") + "not started: " + ", ".join(job.name for job in queued)
        raise KeyboardInterrupt(said or "interrupted")
    if errors:
        raise errors[0][1]
    return {name: outcomes[name][1] for name in names}


def run_jobs(jobs: list[Job], threads: int, progress: Callable[[Any], None] | None = None, *, device: str = "cpu",
             parallel: bool = True, each_bytes: int = 0) -> Mapping[str, Any]:
    """Run ``jobs`` side by side, one per thread at a time, where ``parallel`` and `worth_it` (``each_bytes``: the
    memory each needs); else one after the other in this process, on its own threads. Job name -> its return
    value either way."""
    if parallel and worth_it(device, threads, len(jobs), each_bytes):
        return run_side_by_side(jobs, threads, progress, at_once=threads)
    return {job.name: job.fn(*job.args, progress=progress) for job in jobs}
