"""The one error type for mistakes a user can make (bad spec, unknown model, missing data)."""


class FlowbenchError(Exception):
    """A user-caused error; its message says what was wrong, where, and what to do.

    The CLI prints it as one line and exits non-zero; library code raises it instead of
    letting a low-level exception (KeyError, FileNotFoundError, …) reach the user.
    """
