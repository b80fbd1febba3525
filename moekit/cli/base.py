"""What every verb shares: failures as one line `error: ...` (exit 1, the traceback only with `--debug` or
MOEKIT_DEBUG=1), warnings as one line `warning: ...`, and help text printed as written."""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

# Exceptions that carry their own exit code and message (usage errors, typer.Exit, Ctrl-C's Exit(130)).
PASS_THROUGH = (typer.Exit, typer.Abort, typer.TyperException)
# Errors that moekit raises on bad input, with a message that says what and where: shown without a hint.
EXPECTED = (ValueError, TypeError, KeyError, OSError, ImportError)


def error_line(exc: BaseException) -> str:
    """The one line shown for `exc`: its message, the file an OSError concerns, never a traceback."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        msg = f"{where}: {exc.strerror}"
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        msg = exc.args[0]  # str(KeyError) would quote the message
    else:
        msg = str(exc) or type(exc).__name__
    # messages that list items on indented lines become one line: "a:\n  b\n  c" -> "a: b; c"
    msg = re.sub(r":\s*\n\s*", ": ", msg.strip())
    msg = re.sub(r"\s*\n\s*", "; ", msg)
    if not isinstance(exc, EXPECTED):
        msg += f" ({type(exc).__name__}; run `moekit --debug ...` for the traceback)"
    return msg


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Group(TyperGroup):
    """The `moekit` group: runs the verb, turns any exception into one line and exit code 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except PASS_THROUGH:
                raise
            except BrokenPipeError:
                raise  # output piped into `head`: typer exits quietly
            except Exception as exc:
                if ctx.params.get("debug"):
                    raise
                typer.echo(f"error: {error_line(exc)}", err=True)
                raise typer.Exit(1) from None


class Command(TyperCommand):
    """A verb whose usage line names its arguments in capitals (`moekit eval [OPTIONS] RUN`)."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "arg").upper()
                name = name if p.required else f"[{name}]"
                pieces.append(name + ("..." if p.nargs != 1 else ""))
        return pieces


def plain_help(app: typer.Typer) -> None:
    """Help of `app`, its verbs and sub-apps prints as written: no rich markup (which turns `:A:` into an
    emoji), flags as `--flag` / `--flag/--no-flag`, and usage lines without braces."""
    app.rich_markup_mode = None
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = Command
    for group in app.registered_groups:
        if group.typer_instance is not None:
            plain_help(group.typer_instance)
