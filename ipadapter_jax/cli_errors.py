"""One-line errors for the command-line tools.

``run_cli(tool, fn)`` runs a CLI's main function and turns what escapes it into one line on stderr,
``<tool>: error: <message>`` (argparse's own format, so usage errors and ours read the same):

* a user mistake (a missing or unreadable input file, a bad value, a config error, an adapter that does not
  fit the base, a shard spec that matches nothing) exits 2, like argparse does for a bad flag;
* anything else (a runtime failure: a disk that cannot be written, a bug) exits 1 and says how to get the
  traceback.

``--debug`` (removed from the arguments before the tool sees them) or ``IPADAPTER_JAX_DEBUG=1`` re-raises
instead, so the traceback is printed. The main functions themselves keep raising their exceptions: tests and
notebooks that call them directly see the real exception types.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "IPADAPTER_JAX_DEBUG"


class UserError(ValueError):
    """A mistake in what the user asked for, raised by a CLI's own input checks."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # ValueError covers ConfigError, WeightFileError, ShardSpecError and the checks that raise ValueError for a
    # bad value; the OSError subclasses below are the ones a wrong path gives (other OSErrors are runtime
    # failures: a full disk, a lost mount). absl's flags.Error is a config-file or flag mistake.
    types: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
    try:
        from absl import flags

        types.append(flags.Error)
    except ImportError:  # pragma: no cover - absl is a dependency
        pass
    return tuple(types)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    # A KeyError's str() is the repr of its message (ml_collections' "did you mean" hint arrives that way,
    # even wrapped in an AttributeError): show the message itself.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return " ".join(text.split()) or type(exc).__name__  # a multi-line message joined into one line


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(tool: str, fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Run ``fn(argv)`` (argv without the program name, ``--debug`` removed) as the CLI ``tool`` and exit:
    0 on success (or ``fn``'s integer return code), 2 for a user error, 1 for any other failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        result = fn(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{tool}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except SystemExit as stop:
        # argparse has printed its own "<tool>: error:" line; a SystemExit("message") becomes one of ours.
        if isinstance(stop.code, str) and not debug:
            print(f"{tool}: error: {' '.join(stop.code.split())}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise
    except _user_error_types() as exc:
        if debug:
            raise
        print(f"{tool}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the point is that no traceback reaches the user unasked
        if debug:
            raise
        print(f"{tool}: error: {type(exc).__name__}: {_one_line(exc)} (rerun with {DEBUG_FLAG} or "
              f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


def run_absl_cli(tool: str, main: Callable[[list[str]], Any], argv: Sequence[str] | None = None,
                 define_flags: Callable[[], None] | None = None) -> None:
    """``run_cli`` for an absl tool: ``app.run(main)`` with flag and config-file errors made one line (exit 2)
    instead of absl's "FATAL Flags parsing error" or a traceback. ``define_flags`` defines the tool's flags:
    ml_collections' config flags load the config file and apply ``--config.key=value`` overrides as they are
    defined, so a misspelt key fails there, and that has to happen inside ``run_cli``."""
    from absl import app, flags

    def parse(args: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(args)  # flags.Error propagates to run_cli
        except (AttributeError, KeyError, TypeError) as exc:  # ml_collections applying a bad --config.key=value
            raise UserError(f"bad --config override: {_one_line(exc)}") from exc
        try:
            # A config file that failed to load is a stand-in object that raises only when an attribute of
            # it is read: read one of each flag's value now.
            for name in list(flags.FLAGS):
                getattr(getattr(flags.FLAGS, name), "to_dict", None)
        except OSError as exc:
            raise UserError(str(exc)) from exc
        return rest

    def run(rest: list[str]) -> Any:
        if define_flags is not None:
            try:
                define_flags()
            except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a bad --config.key=value
                raise UserError(f"bad --config override: {_one_line(exc)}") from exc
        return app.run(main, argv=[tool, *rest], flags_parser=parse)

    run_cli(tool, run, argv)


def run_renamed(old: str, module: str) -> None:
    """Run ``python -m module`` with this process's arguments, for a CLI moved there from ``old`` (the old name
    works for one release after the move, with a note on stderr saying so)."""
    import runpy

    print(f"note: {old} is now python -m {module}; the old name goes in the next release", file=sys.stderr,
          flush=True)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
