"""The exceptions advlab raises for mistakes a user can make."""

from __future__ import annotations

__all__ = ["AdvlabError", "AdvlabValueError", "AdvlabTypeError", "NonFiniteError", "ContextExitedError"]


class AdvlabError(Exception):
    """Base class of every error advlab raises on purpose."""


class AdvlabValueError(AdvlabError, ValueError):
    """An argument has the right type but a wrong value or shape."""


class AdvlabTypeError(AdvlabError, TypeError):
    """An argument has the wrong type."""


class NonFiniteError(AdvlabValueError):
    """A loss or a perturbation gradient is NaN or infinite (policy `on_nonfinite="raise"`)."""


class ContextExitedError(AdvlabError, RuntimeError):
    """A free-training context was used after it exited."""
