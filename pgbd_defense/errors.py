"""The one base of every error a user can fix: a bad setting, a missing file or data set,
an unreadable record, results that would be overwritten.

The commands catch :class:`UserError` alone and answer it with one line and exit code 2;
anything else is a bug of ours and keeps its traceback. Each module's own error classes
subclass it (and a builtin exception, so that library callers can still catch
``ValueError`` or ``FileNotFoundError``).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave or pointed at cannot be used; the message says what to fix."""


class ConfigError(UserError, ValueError):
    """A setting (flag, YAML key or value) that cannot be used; names the key and what is expected."""
