"""Image-model artifacts timed interleaved: the check of a speed ratio that a drifting host
cannot skew.

    python bench/interleaved_artifacts.py NAME=ARTIFACT [NAME=ARTIFACT ...] [--batch 8]
                                          [--rounds 5] [--block 3] [--threads 2] [--in-process]
                                          [--load NAME:KEY=VALUE ...]

Each artifact is loaded once (modelkiln.load), in a process of its own
(modelkiln/bench/child_call.py; --in-process: all in this one), and the call `kiln bench`
times on it made at --batch (its exported model on one preprocessed image, repeated);
modelkiln.bench.interleaved times them in --rounds
rounds of --block calls each, the order reversed every other round, after 2 untimed calls
each. Prints each one's median of its rounds' block medians, every round's, and the ratio to
the first. `--load NAME:KEY=VALUE` loads NAME with a runtime option (load(..., KEY=VALUE),
VALUE read as `--set` reads it: TOML, else a string): the same artifact twice, say, once
with `decompress_weights=none`, or on another runtime (`runtime=openvino`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", metavar="NAME=ARTIFACT")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="all runtimes in one process")
    parser.add_argument("--load", action="append", default=[], metavar="NAME:KEY=VALUE")
    args = parser.parse_args()
    from modelkiln.profiles.parsing import apply_override

    paths = dict(item.split("=", 1) for item in args.artifacts)
    options: dict[str, dict[str, Any]] = {name: {} for name in paths}
    for item in args.load:
        name, _, setting = item.partition(":")
        apply_override(options[name], setting)
    timings = interleaved(
        paths,
        args.batch,
        args.threads,
        args.rounds,
        args.block,
        isolate=not args.in_process,
        options=options,
    )
    first = timings[next(iter(paths))].median
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} rounds of {args.block}")
    for name, timing in timings.items():
        rounds = ", ".join(f"{value * 1e3:.0f}" for value in timing.rounds)
        print(
            f"{name}: {timing.median * 1e3:.0f} ms ({first / timing.median:.2f}x the first) "
            f"[{rounds}]"
        )


def interleaved(
    paths: dict[str, str],
    batch: int,
    threads: int,
    rounds: int,
    block: int,
    *,
    isolate: bool = True,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """name -> its Timing (modelkiln.bench.interleaved): each artifact's `kiln bench` call at
    `batch` (its exported model on a preprocessed image repeated), all loaded at once, each in
    a child process unless not `isolate`."""
    from modelkiln.bench.child_call import call_in_child, open_bench_call
    from modelkiln.bench.interleaved import time_interleaved

    def opener(name: str) -> AbstractContextManager[Callable[[], object]]:
        # steps: only generators take them; these are image models
        loaded = dict((options or {}).get(name, {}))
        runtime = loaded.pop("runtime", None)  # load()'s own argument, not a runtime option
        factory = partial(open_bench_call, Path(paths[name]), batch, 1, threads, runtime, loaded)
        return call_in_child(factory) if isolate else factory()

    return time_interleaved(list(paths), opener, rounds=rounds, block=block, warmup=2)


if __name__ == "__main__":
    main()
