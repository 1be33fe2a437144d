"""The one exception type for problems the user can fix.

The CLI prints a FramelmError's message without a traceback; every other exception is a bug
and keeps its traceback. Messages name the bad value, what was expected and, where it helps,
an example.
"""


class FramelmError(Exception):
    """A problem with the user's input, configuration or environment."""


class ConfigError(FramelmError):
    """A configuration key or value that does not fit its declared type or constraint."""


def require_module(module: str, pip_name: str, purpose: str):
    """Import an optional dependency, or fail with the install command that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FramelmError(
            f"{purpose} needs the Python package '{pip_name}', which is not installed "
            f"({exc}). Install it with: pip install {pip_name}"
        ) from None
