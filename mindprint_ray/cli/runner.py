"""Running a typer app as a user-facing command: user errors exit 2 with one message, never a traceback."""

from __future__ import annotations

import sys

from mindprint_ray.errors import UserError


def run_app(app, prog_name: str, argv: list[str] | None = None) -> None:
    """Anything that is not a user error (or a usage error) is a bug and raises with its traceback."""
    import click
    import typer

    usage_errors = (click.exceptions.ClickException, typer.TyperException)  # typer >= 0.2x vendors its own click
    aborts = (click.exceptions.Abort, typer.Abort)
    try:
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except usage_errors as e:  # usage errors (missing argument, bad option value), with standalone_mode=False
        e.show() if hasattr(e, "show") else print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except aborts:
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(code) comes back as the return value without standalone mode
        sys.exit(code)
