"""HTML escaping, and ``Safe`` strings that are already markup."""

from __future__ import annotations


class Safe(str):
    """A string that is inserted without escaping."""


def escape(value: object) -> Safe:
    if isinstance(value, Safe):
        return value
    text = str(value)
    for char, entity in (('&', '&amp;'), ('<', '&lt;'), ('>', '&gt;'), ('"', '&quot;'), ("'", '&#39;')):
        text = text.replace(char, entity)
    return Safe(text)
