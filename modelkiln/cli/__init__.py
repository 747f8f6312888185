"""`kiln`: parse, call the library, print. All output, progress and exit codes live here.

Every error is one red line on stderr (a traceback only with -v; -v and -q, results and
errors only, go anywhere on the line). Exit codes are in exit_codes.py: 1 a check said no,
2 the command could not run (the user can fix it), 70 a bug of ours. The commands live by
verb group:
build.py (build, cache, convert), profiles.py (profiles), run.py (classify, embed),
generate.py (generate, lora-adapter), artifacts.py (info, verify, validate, package, clean),
measure.py (env, doctor, demo, bench), gate.py (compare, ci), tune.py (tune). --json prints
any command's result as one JSON document (jsonout.py; the fields: docs/cli.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import click
from rich.logging import RichHandler
from rich.markup import escape

from modelkiln import __version__
from modelkiln.cli import artifacts, build, gate, generate, measure, profiles, run, tune
from modelkiln.cli.console import err
from modelkiln.cli.exit_codes import INTERNAL_ERROR, INTERRUPTED, USER_ERROR
from modelkiln.errors import KilnError, storage_error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option(
    "-v", "--verbose", is_flag=True, help="Debug logs, and tracebacks on errors (anywhere)."
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Results and errors only: no progress, no warnings."
)
def cli(verbose: bool, quiet: bool) -> None:
    """Compile diffusion and vision models for deployment, run and measure them."""
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other: give one")
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    # RichHandler prints the level itself; basicConfig's default format would repeat it.
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=verbose)],
    )
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "timm", "nncf"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


for command in (
    build.build,
    profiles.profiles,
    build.convert,
    build.cache,
    run.classify,
    run.embed,
    generate.generate,
    generate.lora_adapter,
    artifacts.info,
    artifacts.verify,
    artifacts.validate,
    artifacts.package,
    artifacts.clean,
    measure.env,
    measure.doctor,
    measure.demo,
    measure.bench,
    gate.compare,
    gate.ci,
    tune.tune,
):
    cli.add_command(command)


# Flags of the whole program, accepted after the subcommand too (`kiln build ... -v`).
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """-v/-q moved before the subcommand, where click reads them (not past a `--`)."""
    end = list(args).index("--") if "--" in args else len(args)
    flags = [arg for arg in args[:end] if arg in GLOBAL_FLAGS]
    rest = [arg for index, arg in enumerate(args) if index >= end or arg not in GLOBAL_FLAGS]
    return [*dict.fromkeys(flags), *rest]


def main(argv: Sequence[str] | None = None) -> None:
    args = hoist_global_flags(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    if not verbose:
        # transformers logs config chatter through its own handler; the CLI owns the terminal.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stdout.isatty():
        # Piped output (CI logs, `| less`) is not squeezed into rich's 80-column default.
        os.environ.setdefault("COLUMNS", "120")
    try:
        cli.main(args=args, prog_name="kiln", standalone_mode=True)
    except KilnError as error:
        _fail(str(error), verbose)
    except OSError as error:  # the disk, permissions or paths, never a bug of ours
        _fail(str(storage_error(error)), verbose)
    except MemoryError:
        _fail(
            "out of memory; free memory, use a smaller batch or image size, or a larger machine",
            verbose,
        )
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(INTERRUPTED)
    except Exception as error:  # a bug: still one line, the traceback with -v
        _fail(
            f"{type(error).__name__}: {error} (run with -v for the traceback and please report it)",
            verbose,
            label="internal error",
            code=INTERNAL_ERROR,
        )


def _fail(message: str, verbose: bool, *, label: str = "error", code: int = USER_ERROR) -> None:
    if verbose:
        err.print_exception()
    err.print(f"[red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
