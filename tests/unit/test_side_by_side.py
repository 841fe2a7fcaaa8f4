"""Jobs run side by side in real processes: results, events, the threads shared out, failures named."""

from __future__ import annotations

import os
import time

import pytest

from mechbiqa.train.side_by_side import Job, run_side_by_side


# ----------------------------------------------------------------------------- jobs (top level: spawned)
def quick(value: int, after: str | None = None, *, progress) -> dict:
    import torch

    while after is not None and not os.path.exists(after):  # until the other job has started
        time.sleep(0.02)

    progress(("quick", torch.get_num_threads()))
    return {"value": value, "threads": torch.get_num_threads()}


def waits_for_the_threads(limit: float, started: str | None = None, *, progress) -> list[int]:
    """Report until this process has been given both threads (the other job ended) or ``limit`` s pass."""
    import torch

    seen = [torch.get_num_threads()]
    if started is not None:
        open(started, "w").close()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        seen.append(torch.get_num_threads())
        progress(("waiting", seen[-1]))
        if seen[-1] == 2:
            break
        time.sleep(0.05)
    return seen


def fails(progress) -> None:
    raise ValueError("record 7 has no level; fix it or drop it")


def dies(progress) -> None:
    os._exit(3)


def interrupted(progress) -> None:
    raise KeyboardInterrupt("interrupted at step 4; checkpoint written to x")


# ----------------------------------------------------------------------------- tests
def test_values_and_events_come_back_and_the_last_job_running_takes_every_thread(tmp_path):
    events = []
    flag = str(tmp_path / "b started")
    done = run_side_by_side([Job("a", quick, (5, flag)), Job("b", waits_for_the_threads, (60.0, flag))],
                            threads=2, progress=events.append)
    assert done["a"] == {"value": 5, "threads": 1}  # two jobs, two threads: one each
    seen = done["b"]
    assert seen[0] == 1 and seen[-1] == 2  # once "a" ended, "b" took its thread at its next event
    assert ("quick", 1) in events and [e for e in events if e[0] == "waiting"] == [("waiting", n) for n in seen[1:]]


def test_a_failed_job_is_raised_as_it_was_once_the_others_end():
    started = time.monotonic()
    with pytest.raises(ValueError, match="record 7 has no level; fix it or drop it"):
        run_side_by_side([Job("a", fails), Job("b", waits_for_the_threads, (3.0,))], threads=2)
    assert time.monotonic() - started < 60


def test_a_job_that_dies_without_a_word_is_named_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"the b process ended without a result \(exit code 3\)"):
        run_side_by_side([Job("a", quick, (1,)), Job("b", dies)], threads=2)


def test_interrupted_jobs_give_one_interrupt_naming_each():
    with pytest.raises(KeyboardInterrupt) as caught:
        run_side_by_side([Job("one-stage", interrupted), Job("two-stage", quick, (2,))], threads=2)
    assert str(caught.value) == "one-stage: interrupted at step 4; checkpoint written to x"


def timed(flag_out: str | None = None, flag_in: str | None = None, limit: float = 120.0, *, progress) -> dict:
    """Create ``flag_out``, wait (up to ``limit`` s) for ``flag_in``; when it started and ended, and its threads."""
    import torch

    began = time.monotonic()
    if flag_out is not None:
        open(flag_out, "w").close()
    deadline = began + limit
    while flag_in is not None and not os.path.exists(flag_in) and time.monotonic() < deadline:
        time.sleep(0.02)
    progress(("timed", torch.get_num_threads()))
    return {"began": began, "ended": time.monotonic(), "saw": flag_in is None or os.path.exists(flag_in),
            "threads": torch.get_num_threads()}


def test_at_once_starts_the_next_job_when_one_ends_not_when_all_do(tmp_path):
    c_started = str(tmp_path / "c started")
    done = run_side_by_side([Job("a", timed), Job("b", timed, (None, c_started)), Job("c", timed, (c_started,))],
                            threads=2, at_once=2)
    a, b, c = done["a"], done["b"], done["c"]
    assert c["began"] >= a["ended"]  # never three at once
    assert b["saw"] and c["began"] < b["ended"]  # c began while b still ran: it took a's place


def test_after_a_failure_or_an_interrupt_no_further_job_starts(tmp_path):
    never = str(tmp_path / "never")
    with pytest.raises(ValueError, match="record 7"):
        run_side_by_side([Job("a", fails), Job("b", timed, (never,))], threads=2, at_once=1)
    assert not os.path.exists(never)
    with pytest.raises(KeyboardInterrupt) as caught:
        run_side_by_side([Job("one-stage", interrupted), Job("b", timed, (never,))], threads=2, at_once=1)
    assert not os.path.exists(never)
    assert str(caught.value) == "one-stage: interrupted at step 4; checkpoint written to x; not started: b"


def test_jobs_that_would_not_fit_in_memory_together_run_one_after_the_other():
    from mechbiqa.train.side_by_side import available_memory, worth_it

    free = available_memory()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no more than the machine has
    # (margins: the free memory moves between calls)
    assert worth_it("cpu", 2, 2, each_bytes=free // 8)  # two of them: a quarter of the free memory
    assert not worth_it("cpu", 2, 2, each_bytes=free)  # e.g. two 16 GB 7B checkpoints on 24 GB
    assert worth_it("cpu", 2, 4, each_bytes=free // 8)  # one per thread at a time, not all four
    assert not worth_it("cuda", 2, 2) and not worth_it("cpu", 1, 2) and not worth_it("cpu", 2, 1)
