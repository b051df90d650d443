"""The `memplan` command. A thin layer: parse flags, call the library, print.

Built on click (typer's own foundation, without its pydantic start-up cost:
`memplan estimate` is a short-lived command). Every input problem is a
`MemplanError` or a click usage error; both end as one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from memplan.errors import MemplanError

__all__ = ["app", "main", "entrypoint"]


@click.group(
    name="memplan",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="memplan", prog_name="memplan")
def app() -> None:
    """Will it fit, is the estimate right, and what does it cost: LLM fine-tuning and serving memory."""


# Each command lives in its own module and registers itself on `app`.
from memplan.commands import estimate as _estimate  # noqa: E402,F401
from memplan.commands import models as _models  # noqa: E402,F401
from memplan.commands import profile as _profile  # noqa: E402,F401
from memplan.commands import validate as _validate  # noqa: E402,F401
from memplan.commands import plan as _plan  # noqa: E402,F401
from memplan.commands import fit as _fit  # noqa: E402,F401
from memplan.commands import calibrate as _calibrate  # noqa: E402,F401
from memplan.commands import app as _app  # noqa: E402,F401
from memplan.commands import sweep as _sweep  # noqa: E402,F401
from memplan.commands import report as _report  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status instead of exiting (tests call this)."""
    try:
        # Outside standalone mode click returns a command's `Exit(n)` code instead of raising it.
        rv = app.main(args=argv, prog_name="memplan", standalone_mode=False)
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
    return 0


def entrypoint() -> None:
    sys.exit(main())
