"""call_in_child: the timed call runs in a process of its own, and its errors come back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from modelkiln.bench.child_call import TimingProcessError, call_in_child
from modelkiln.bench.interleaved import time_interleaved
from modelkiln.errors import InputError


@contextmanager
def pid_writer(log: Path) -> Iterator[Callable[[], object]]:
    """Opened in the child: each call appends the child's pid to `log`."""

    def write(event: str) -> None:
        with log.open("a") as opened:
            opened.write(f"{event} {os.getpid()}\n")

    write("open")
    yield lambda: write("call")


@contextmanager
def failing(where: str, error: BaseException) -> Iterator[Callable[[], object]]:
    if where == "open":
        raise error

    def call() -> None:
        if where == "exit":
            os._exit(3)
        raise error

    yield call


def test_each_configuration_runs_in_its_own_process(tmp_path: Path) -> None:
    logs = {label: tmp_path / f"{label}.log" for label in ("a", "b")}
    timings = time_interleaved(
        ["a", "b"],
        lambda label: call_in_child(partial(pid_writer, logs[label])),
        rounds=2,
        block=2,
        warmup=1,
    )
    assert set(timings) == {"a", "b"}
    pids = {}
    for label, log in logs.items():
        lines = log.read_text().splitlines()
        # opened once, then one warm-up and 2 rounds of 2 calls, all in one child
        assert [line.split()[0] for line in lines] == ["open"] + ["call"] * 5
        (pids[label],) = {int(line.split()[1]) for line in lines}
    assert os.getpid() not in pids.values()
    assert pids["a"] != pids["b"]


def test_a_kiln_error_in_the_child_is_raised_as_it_was() -> None:
    with (
        pytest.raises(InputError, match="no such artifact: /x; build it first"),
        call_in_child(partial(failing, "open", InputError("no such artifact: /x; build it first"))),
    ):
        pass
    with (
        call_in_child(partial(failing, "call", InputError("wrong shape"))) as call,
        pytest.raises(InputError, match="wrong shape"),
    ):
        call()


def test_other_failures_are_one_line_naming_the_error() -> None:
    with (
        call_in_child(partial(failing, "call", ValueError("bad value\nmore"))) as call,
        pytest.raises(TimingProcessError) as raised,
    ):
        call()
    assert str(raised.value) == "the timing process failed: ValueError: bad value"
    with (
        call_in_child(partial(failing, "exit", ValueError())) as call,
        pytest.raises(TimingProcessError, match=r"exited \(code 3\) before it answered"),
    ):
        call()


@contextmanager
def doubler() -> Iterator[Callable[..., object]]:
    yield lambda value: {"doubled": value * 2, "pid": os.getpid()}


def test_the_call_takes_arguments_and_returns_its_result() -> None:
    with call_in_child(doubler) as call:
        result = call(21)
        assert result["doubled"] == 42 and result["pid"] != os.getpid()
        assert call(0.5)["doubled"] == 1.0
