"""The one exception type that means "the user gave us something we cannot use".

The CLI prints such errors as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class LocalmixError(Exception):
    """Bad input: a missing or broken file, a wrong config, an unknown name, a bad parameter."""
