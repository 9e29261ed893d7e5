"""What every command shares: option types, the error boundary, and where the data directory is.

Commands import from here, never from each other or from the app that registers them, so the
command modules form a tree with `app.py` at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from explainer.errors import ClearsightError, ConfigError, cli_message, exit_code_for

P = ParamSpec("P")
R = TypeVar("R")

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the catalog and index live "
        "(default: $CLEARSIGHT_DATA_DIR, else ~/.local/share/clearsight)",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Encoder: registry name, hub id or local directory (see `clearsight models`)"
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
Precision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="auto, fp32, bf16 or fp16 (default: $CLEARSIGHT_PRECISION, else auto: fp16 on CUDA, "
        "bf16 on a CPU with native bf16, fp32 otherwise)",
        show_default=False,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")]
Host = Annotated[str | None, typer.Option("--host", help="Interface to listen on (default: 127.0.0.1)")]
Port = Annotated[int | None, typer.Option("--port", "-p", min=0, max=65535, help="Port (default: 8000)")]


def error(message: str) -> None:
    """One line on stderr, prefixed so a user can tell it from program output."""
    typer.echo(f"clearsight: error: {message}", err=True)


def note(message: str) -> None:
    """A remark on stderr (stdout stays for results, so `--json` output is one object)."""
    typer.echo(message, err=True)


def boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Typed errors become one line on stderr and an exit code; never a stack trace for expected failures."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from explainer.settings import get_settings

        # A command reads the environment as it is now, as a fresh process would (in-process callers,
        # such as tests and `clearsight run`, may have changed it since an earlier command).
        clear = getattr(get_settings, "cache_clear", None)
        if clear is not None:
            clear()
        try:
            return fn(*args, **kwargs)
        except ClearsightError as exc:
            error(cli_message(exc))
            raise typer.Exit(exit_code_for(exc)) from None
        except KeyboardInterrupt:
            error("interrupted; work committed so far is kept, run the command again to finish")
            raise typer.Exit(130) from None

    return wrapper


def data_dir_or_default(data_dir: Path | None) -> Path:
    """The `--data-dir` given, else the one from settings ($CLEARSIGHT_DATA_DIR or the user data dir)."""
    from explainer.settings import get_settings

    return data_dir or get_settings().data_dir


def precision_or_setting(precision: str | None) -> str:
    """The `--precision` given, else $CLEARSIGHT_PRECISION; checked before any model loads."""
    from explainer.settings import get_settings
    from retrieval.encoders import PRECISIONS

    value = (precision or get_settings().precision or "auto").strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"unknown precision {value!r}: use {', '.join(PRECISIONS)}")
    return value
