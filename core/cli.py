"""The ``atomforge`` command line: sub-commands come from the ``register_commands`` hook."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator, Sequence

from ._errors import AtomforgeError
from ._specs import PluginKind
from .registry import Registry, make_registry

__all__ = ["main", "build_parser", "quiet_output", "version_line"]


def build_parser(registry: Registry) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The argument parser with one sub-parser per registered command."""
    parser = argparse.ArgumentParser(
        prog="atomforge", description="Machine-learned interatomic potentials: train, evaluate, run MD."
    )
    parser.add_argument("--strict-plugins", action="store_true",
                        help="fail on a broken plugin instead of warning")
    parser.add_argument("--version", action="store_true", help="print the versions of atomforge, torch and Python")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners: dict[str, object] = {}
    for provided in registry.entries(PluginKind.COMMAND):
        spec = provided.spec
        command_parser = sub.add_parser(spec.name, help=spec.help or spec.description,
                                        description=spec.description)
        runners[spec.name] = spec.factory(command_parser)
    return parser, runners


def version_line() -> str:
    """``atomforge X (torch Y, Python Z)``: what ``atomforge --version`` prints. The versions are
    those of the installed distributions (``importlib.metadata``), i.e. what ``pip`` installed;
    a source tree that is not installed falls back to ``atomforge.__version__``."""
    import importlib.metadata
    import platform

    def installed(name: str, fallback: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return fallback

    from . import __version__

    return (f"atomforge {installed('atomforge', __version__)} (torch {installed('torch', 'not installed')}, "
            f"Python {platform.python_version()})")


QUIET_LOGGERS = ("mlflow", "alembic")  # libraries that log INFO lines through handlers of their own


@contextlib.contextmanager
def quiet_output(quiet: bool) -> Iterator[None]:
    """``--quiet``: MLflow and alembic (MLflow's database migrations) log INFO lines through their
    own stderr handlers ("Creating initial MLflow database tables..."); while ``quiet`` only their
    warnings and errors pass (or a stricter ``MLFLOW_LOGGING_LEVEL`` the user set).
    ``MLFLOW_LOGGING_LEVEL`` is read when mlflow is imported, here or in the processes this one
    starts (active-learning training jobs); the logger levels cover an mlflow imported already.
    Both are restored afterwards (``main`` may be called in-process, e.g. by tests)."""
    if not quiet:
        yield
        return
    saved_env = os.environ.get("MLFLOW_LOGGING_LEVEL")
    user = logging.getLevelName((saved_env or "WARNING").upper())
    level = max(user if isinstance(user, int) else logging.WARNING, logging.WARNING)
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    os.environ["MLFLOW_LOGGING_LEVEL"] = logging.getLevelName(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
        else:
            os.environ["MLFLOW_LOGGING_LEVEL"] = saved_env
        for name, saved in saved_levels.items():
            if saved == logging.NOTSET and name == "mlflow" and "mlflow" in sys.modules:
                saved = logging.getLevelName((saved_env or "INFO").upper())  # mlflow, imported meanwhile, sets this
            logging.getLogger(name).setLevel(saved if isinstance(saved, int) else logging.INFO)


def _strip_launcher_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher inserts ``--local_rank=N`` before the command; the rank is also
    in the ``LOCAL_RANK`` environment variable, which is what atomforge reads."""
    out: list[str] = []
    skip = False
    for k, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and k + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[k + 1])
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = _strip_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    global_options = argv[: next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))]
    if "--version" in global_options:  # before the plugins are loaded: instant, and works with a broken plugin
        print(version_line())
        return 0
    try:
        registry = make_registry(strict="--strict-plugins" in global_options)
        parser, runners = build_parser(registry)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        with quiet_output(bool(getattr(args, "quiet", False))):  # train/md/relax/al run --quiet
            return int(runners[args.command](args, registry) or 0)  # type: ignore[operator]
    except AtomforgeError as error:
        print(f"atomforge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `atomforge plugins | head`
        sys.stderr.close()
        return 0
