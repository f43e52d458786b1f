"""The one error type for mistakes a user can make (bad spec, unknown model, missing data)."""

import difflib


class FlowbenchError(Exception):
    """A user-caused error; its message says what was wrong, where, and what to do.

    The CLI prints it as one line and exits non-zero; library code raises it instead of
    letting a low-level exception (KeyError, FileNotFoundError, …) reach the user.
    """


def unknown_name(kind: str, name: str, known) -> str:
    """'unknown model 'glwo': did you mean 'glow'? known models are …' — one wording everywhere."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {kind} {name!r}: {hint}known {kind}s are {', '.join(known)}"
