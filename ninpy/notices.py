"""ninpy's warnings: one line on stderr, `warning: <message>`, like train.py's own notes.

    from .notices import warn
    warn("cannot write the dataset cache in ...; the raw files will be parsed again next time")

Python prints a warning on two lines (`file:line: UserWarning: message`, then the line of source
that warned), which tells a user of train.py about our code, not about their problem. ninpy warns
with NinpyWarning, a UserWarning (so warning filters and `pytest.warns(UserWarning)` treat it as
before), and only that category is printed on one line; every other warning keeps Python's format.
"""
import warnings

__all__ = ["NinpyWarning", "warn"]


class NinpyWarning(UserWarning):
    """A warning from ninpy: a problem worked around (a cache rebuilt, a setting ignored)."""


_python_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None):
    if issubclass(category, NinpyWarning):
        return "warning: " + " ".join(str(message).split()) + "\n"
    return _python_format(message, category, filename, lineno, line)


warnings.formatwarning = _format


def warn(message, stacklevel=2):
    """Warn with NinpyWarning; stacklevel as warnings.warn's, counted from the caller."""
    warnings.warn(message, NinpyWarning, stacklevel=stacklevel + 1)
