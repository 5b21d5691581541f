"""The one exception type for bad user input.

Anything a user can fix (a missing file, a malformed annotation, a checkpoint that does not fit,
flags that contradict each other) raises :class:`UserInputError` with a one-line message that
names the file or flag and the problem. The CLI prints it as ``ssd300: error: <message>`` and
exits with status 2, without a traceback.
"""


class UserInputError(Exception):
    """Bad input that the user can fix; the message is shown to them as it is."""
