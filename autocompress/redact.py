"""Credentials stay in the process: every URL shown to a person or written to disk goes through here.

A storage URL may hold a password (``postgresql://alice:secret@host/db``). Messages, log lines, reports,
the run folder's ``study.yaml`` and the study's stored attributes show it as ``***``, the way
SQLAlchemy renders a URL with ``hide_password=True``.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "mask_secrets", "mask_url"]

MASK = "***"

# scheme://user:PASSWORD@host (the password runs to the last "@" before a blank or a quote)
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]*:)([^\s'\"]*)(@)")
# libpq keywords and query strings: password=... / passwd=...
_KEY_PASSWORD = re.compile(
    r"(\b(?:password|passwd|pwd)\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)", re.IGNORECASE
)


def mask_secrets(text: str) -> str:
    """``text`` with every password of a URL (``user:PASSWORD@``) or ``password=...`` pair replaced by ``***``."""
    if "@" not in text and "=" not in text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
    return _KEY_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)


def mask_url(url: str) -> str:
    """A storage URL as it may be shown: SQLAlchemy's rendering with the password hidden (any other
    text: :func:`mask_secrets`)."""
    try:
        from sqlalchemy.engine import make_url

        return mask_secrets(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a database URL (a journal file, a typo): hide what looks like a password
        return mask_secrets(url)
