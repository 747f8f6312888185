"""`kiln`: parse, call the library, print. All output, progress and exit codes live here.

Every KilnError becomes one red line on stderr and exit code 1 (a traceback only with -v);
click's usage errors exit with 2. The commands live by verb group:
build.py (build, profiles), run.py (classify, embed, generate), artifacts.py (info, verify,
validate, package), measure.py (env, demo, bench, compare).
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
from modelkiln.cli import artifacts, build, measure, run
from modelkiln.cli.console import err
from modelkiln.errors import KilnError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs, and tracebacks on errors.")
def cli(verbose: bool) -> None:
    """Compile diffusion and vision models for deployment, run and measure them."""
    level = logging.DEBUG if verbose else logging.WARNING
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
    build.profiles,
    run.classify,
    run.embed,
    run.generate,
    artifacts.info,
    artifacts.verify,
    artifacts.validate,
    artifacts.package,
    measure.env,
    measure.demo,
    measure.bench,
    measure.compare,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
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
        if verbose:
            err.print_exception()
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as error:  # a bug: still one line, the traceback with -v
        if verbose:
            err.print_exception()
        err.print(
            f"[red]internal error:[/] {type(error).__name__}: {escape(str(error))} "
            "(run with -v for the traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
