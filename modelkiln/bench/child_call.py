"""A call that runs in a process of its own, for interleaved timing across runtimes.

Loaded side by side in one process, runtimes slow each other down even while only one of them
runs: on an AMD EPYC with 2 threads, ExecuTorch's XNNPACK program took 12 % longer beside
ONNX Runtime, OpenVINO and torch than alone, with the others idle (and a 0.5 s pause before
each of its blocks did not help). `kiln bench` runs each artifact in a process of its own, so
an in-process ranking disagreed with it. In a child process per configuration, the parent
still interleaves the blocks, one configuration at a time, and each runtime runs as it would
alone. The parent's time of a call includes one pipe round trip (tens of microseconds).
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError

# Opens the call to time, in the child: a picklable (module-level, or a functools.partial of
# one) function whose context manager yields it. What the call returns goes back pickled.
CallFactory = Callable[[], AbstractContextManager[Callable[..., Any]]]

_RUN = "run"
_STOP = "stop"


class TimingProcessError(KilnError, RuntimeError):
    """The child process died or failed with an error that is not one of ours."""


@contextmanager
def call_in_child(factory: CallFactory) -> Iterator[Callable[..., Any]]:
    """Start a process that opens `factory()` and waits; yield a call that runs the opened
    call there once, with the (picklable) arguments it is given, and returns what it
    returned. A KilnError raised in the child (while opening or calling) is raised here as it
    was."""
    # spawn: a fork would inherit the parent's runtimes and their thread pools.
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child, factory), daemon=True)
    process.start()
    child.close()
    try:
        _answer(parent, process)  # opened

        def call(*args: Any) -> Any:
            parent.send((_RUN, args))
            return _answer(parent, process)

        yield call
    finally:
        if process.is_alive():
            with suppress(OSError):  # the child is gone already
                parent.send(_STOP)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()


@contextmanager
def open_bench_call(
    artifact: Path,
    batch: int,
    steps: int,
    threads: int | None,
    runtime: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Iterator[Callable[[], None]]:
    """The artifact loaded (`options`: the runtime's own, as load() takes them), and the call
    `kiln bench` times on it (what a child opens)."""
    from modelkiln.loading import load

    with load(artifact, runtime=runtime, threads=threads, **(options or {})) as pipeline:
        timed = pipeline.bench_call(batch, steps)

        def call() -> None:  # its result stays in the child: only the time matters
            timed()

        yield call


def bench_call_in_child(
    artifact: Path, batch: int, steps: int, threads: int | None, runtime: str | None = None
) -> AbstractContextManager[Callable[[], None]]:
    """`kiln bench`'s call on the artifact, in a child process of its own."""
    return call_in_child(partial(open_bench_call, artifact, batch, steps, threads, runtime))


def _answer(connection: Connection, process: Any) -> Any:
    try:
        status, value = connection.recv()
    except EOFError:
        process.join(timeout=5)
        raise TimingProcessError(
            f"the timing process exited (code {process.exitcode}) before it answered; "
            "run the configuration alone (kiln bench ARTIFACT) to see why"
        ) from None
    if status != "ok":
        raise value
    return value


def _serve(connection: Connection, factory: CallFactory) -> None:
    try:
        with factory() as call:
            connection.send(("ok", None))
            while (command := connection.recv()) != _STOP:
                _, args = command
                connection.send(("ok", call(*args)))
    except EOFError:  # the parent is gone
        pass
    except BaseException as error:  # sent to the parent, which raises it
        with suppress(OSError):
            connection.send(("error", _portable(error)))
    finally:
        connection.close()


def _portable(error: BaseException) -> BaseException:
    """The error itself where it survives pickling (our KilnErrors do), else its line."""
    if isinstance(error, KilnError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # an unpicklable argument: keep the message
            pass
    line = (str(error).strip().splitlines() or [""])[0]
    return TimingProcessError(f"the timing process failed: {type(error).__name__}: {line}")


__all__ = [
    "CallFactory",
    "TimingProcessError",
    "bench_call_in_child",
    "call_in_child",
    "open_bench_call",
]
