"""The one exception whose message is written for the user."""

from __future__ import annotations


class SnaplookError(Exception):
    """A failure the user can fix: what failed, which file or value, what to do.

    ``cli.py`` prints ``Error: <message>`` on stderr and exits 1; library callers can
    catch it and show ``str(exc)`` as it is.
    """
