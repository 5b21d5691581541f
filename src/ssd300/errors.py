"""The one exception type for bad user input.

Anything a user can fix (a missing file, a malformed annotation, a checkpoint that does not fit,
flags that contradict each other) raises :class:`UserInputError` with a one-line message that
names the file or flag and the problem. The CLI prints it as ``ssd300: error: <message>`` and
exits with status 2, without a traceback.
"""


class UserInputError(Exception):
    """Bad input that the user can fix; the message is shown to them as it is."""


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as a short single line for a UserInputError message: ``Type: first line``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {' '.join(lines[0].split())}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
