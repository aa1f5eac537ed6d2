"""Splitting lines into fields: quoted fields may hold delimiters, and a doubled quote character
inside quotes stands for one literal quote (RFC 4180)."""

from __future__ import annotations


def split_row(line: str, delimiter: str = ",", quotechar: str = '"') -> list[str]:
    fields: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if quoted:
            if c == quotechar:
                if i + 1 < len(line) and line[i + 1] == quotechar:
                    current.append(quotechar)
                    i += 2
                    continue
                quoted = False
            else:
                current.append(c)
        elif c == quotechar:
            quoted = True
        elif c == delimiter:
            fields.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    fields.append("".join(current))
    return fields


def count_outside_quotes(line: str, char: str, quotechar: str = '"') -> int:
    """How many times ``char`` occurs in ``line`` outside quoted fields."""
    count, quoted = 0, False
    for c in line:
        if c == quotechar:
            quoted = not quoted
        elif c == char and not quoted:
            count += 1
    return count


def data_lines(text: str) -> list[str]:
    """The non-blank lines of ``text`` (any line ending)."""
    return [line for line in text.splitlines() if line.strip()]


def read_rows(text: str, dialect) -> list[list[str]]:
    """All rows of ``text`` (the header too, if there is one), split with ``dialect``."""
    return [split_row(line, dialect.delimiter, dialect.quotechar) for line in data_lines(text)]
