"""The exception types the commands turn into exit codes, and the codes themselves.

Anything a user can fix (a missing file, a malformed annotation, a checkpoint that does not fit,
flags that contradict each other, an unwritable output path) raises :class:`UserInputError` with
a one-line message that names the file or flag and the problem. The CLI prints it as
``ssd300 <command>: error: <message>`` and exits with the error's ``exit_code`` (2 unless a
subclass says otherwise), without a traceback.

Exit codes of every ``ssd300`` command (README, "Exit codes"):

====  ===========================================================================
0     success
1     unexpected error (a bug: the traceback is printed)
2     bad input or usage: flags, files, data, output paths (one line, before the work where possible)
3     training diverged: the loss became NaN/inf (no step was taken with it)
4     ``detect``: no input image could be read (the skipped files are listed in images.json)
130   stopped by SIGINT (Ctrl-C); 143: stopped by SIGTERM (a checkpoint was written when training)
====  ===========================================================================
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_NO_RESULTS = 4
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success", EXIT_ERROR: "unexpected error", EXIT_USAGE: "bad input", EXIT_DIVERGED: "training diverged",
    EXIT_NO_RESULTS: "detect read no image", 130: "SIGINT", 143: "SIGTERM",
}


class UserInputError(Exception):
    """Bad input that the user can fix; the message is shown to them as it is.

    The library speaks Python: a message about an argument or config field names it as Python
    does (``batch_size must be >= 1, got 0``) and lists it in ``fields``. The CLI rewrites those
    names into its flags (``--batch-size must be >= 1, got 0``) through one table
    (:func:`ssd300.commands.options.cli_message`), so each wording is right for its reader.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps ``fields`` when the error crosses a process boundary (DataLoader workers).
        return (_rebuild, (type(self), str(self), self.fields))


def _rebuild(cls: "type[UserInputError]", message: str, fields: tuple[str, ...]) -> UserInputError:
    error = cls.__new__(cls)
    UserInputError.__init__(error, message, fields=fields)
    return error


class NoResultsError(UserInputError):
    """Every input failed, so the command produced nothing useful (``detect``: exit 4)."""

    exit_code = EXIT_NO_RESULTS


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal; ``exit_code`` follows the shell's convention (128 + signal number)."""

    def __init__(self, message: str = "interrupted", signal_number: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal_number = int(signal_number)

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as a short single line for a UserInputError message: ``Type: first line``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {' '.join(lines[0].split())}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
