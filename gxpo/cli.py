"""What every command-line entry point shares: a user's error is one line and exit status 2.

    from gxpo import cli

    def main(argv): ...

    if __name__ == "__main__":
        cli.run(main)

`run` is `absl.app.run` with two changes (and `gxpo.allocator.keep_freed_memory` first). A
flag that does not parse (an unknown flag, a bad `--config.<field>` value, a config file that
does not exist) prints one line, `error: ...`, and exits with status 2.
An error a user causes while `main` runs (`USER_ERRORS`: a bad config
value, a missing or malformed file, a wrong model path, an unsupported model family) prints
one line the same way; `--verbose` shows the whole traceback instead. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

from gxpo import allocator

EXIT_USER_ERROR = 2

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a user's error.")


class UserError(Exception):
    """An error of the user's input that is not a `ValueError` / `OSError` (those count too)."""


# What a user's input causes: the package raises these with a message that names the field,
# file or path and the fix. OSError covers missing, unreadable and unwritable files, a work
# directory that is a file, and a full disk.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def _say(message: str) -> None:
    line = " ".join(str(message).split())  # one line, whatever the message's own layout
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _say(f"{error} (--helpshort lists the flags)")
        sys.exit(EXIT_USER_ERROR)
    except (AttributeError, KeyError, *USER_ERRORS) as error:
        # ml_collections' config flag raises these while parsing: a --config.<field> that
        # names no field (AttributeError), or a config file that failed to load (OSError).
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.lstrip("-").startswith("config.")]
        if isinstance(error, (AttributeError, KeyError)):
            error = f"no config field {error} in one of the overrides {overrides}"
        _say(f"{error} (--helpshort lists the flags)")
        sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)`, with a user's error as one line and exit status 2, in a process
    that keeps freed memory for its next steps (`gxpo.allocator`)."""
    allocator.keep_freed_memory()

    def guarded(argv: list[str]) -> object:
        try:
            return main(argv)
        except USER_ERRORS as error:
            if _VERBOSE.value:
                raise
            _say(f"{error} (--verbose shows the traceback)")
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded, flags_parser=_parse_flags)
