"""The `memplan` command. A thin layer: parse flags, call the library, print.

Built on click (typer's own foundation, without its pydantic start-up cost:
`memplan estimate` is a short-lived command). Every input problem is a
`MemplanError` or a click usage error; both end as one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from memplan.errors import MemplanError

__all__ = ["app", "main", "entrypoint", "COMMANDS"]


# Each command is a plain click command in its own module, loaded only when it runs (or when
# `--help` lists them), so `memplan estimate` never imports the planner, the profiler or pandas.
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("memplan.commands.estimate", "estimate"),
    "fit": ("memplan.commands.fit", "fit"),
    "models": ("memplan.commands.models", "models"),
    "plan": ("memplan.commands.plan", "plan_command"),
    "sweep": ("memplan.commands.sweep", "sweep_command"),
    "report": ("memplan.commands.report", "report_command"),
    "profile": ("memplan.commands.profile", "profile"),
    "validate": ("memplan.commands.validate", "validate"),
    "calibrate": ("memplan.commands.calibrate", "calibrate"),
    "app": ("memplan.commands.app", "app_command"),
}


class _LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's documented lazy-group pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module}.{attr} is not a click command")
        return command


@click.group(
    name="memplan",
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="memplan", prog_name="memplan")
def app() -> None:
    """Will it fit, is the estimate right, and what does it cost: LLM fine-tuning and serving memory."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status instead of exiting (tests call this)."""
    try:
        # Outside standalone mode click returns a command's `Exit(n)` code instead of raising it.
        rv = app.main(args=argv, prog_name="memplan", standalone_mode=False)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, not in the interpreter's exit
        if isinstance(rv, int):
            return rv
    except MemplanError as exc:
        click.echo(f"memplan: error: {exc}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("memplan: interrupted", err=True)
        return 130
    except click.exceptions.ClickException as exc:
        msg = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `memplan {ctx.info_name} --help`)" if ctx is not None and ctx.info_name != "memplan" else ""
        click.echo(f"memplan: error: {msg}{hint}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        # click turns a closed stdout pipe (EPIPE) into sys.exit(1) even outside standalone mode,
        # after wrapping stdout in its PacifyFlushWrapper (click/core.py, BaseCommand.main).
        if type(sys.stdout).__name__.lstrip("_") != "PacifyFlushWrapper":
            raise
        import errno

        return _os_error(OSError(errno.EPIPE, "Broken pipe"))
    except OSError as exc:  # the output could not be written (disk full, closed pipe, read-only file)
        return _os_error(exc)
    return 0


def _os_error(exc: OSError) -> int:
    """One line for a file or stream memplan could not use; exit status 2."""
    import errno

    _silence_stdout()
    reason = exc.strerror or type(exc).__name__
    hint = {errno.ENOSPC: "free some space or write somewhere else",
            errno.EPIPE: "the program reading memplan's output closed it early"}.get(exc.errno or 0, "check the path and its permissions")
    what = f"cannot use {exc.filename}" if getattr(exc, "filename", None) else "cannot write the output"
    click.echo(f"memplan: error: {what}: {reason}; {hint}", err=True)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail a second time
    (the Python docs' advice for SIGPIPE: https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass


def entrypoint() -> None:
    sys.exit(main())
