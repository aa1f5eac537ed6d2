"""Guessing the dialect of a sample: delimiter, quote character and header row."""

from __future__ import annotations

from dataclasses import dataclass

from .split import count_outside_quotes, data_lines, split_row

CANDIDATES = (",", ";", "\t", "|")


class SniffError(ValueError):
    """The sample does not look like delimited data."""


@dataclass(frozen=True)
class Dialect:
    delimiter: str
    quotechar: str = '"'
    has_header: bool = False


def sniff_delimiter(sample: str, candidates=CANDIDATES, quotechar: str = '"') -> str:
    """The candidate that splits the most lines into the same number of fields as the first line
    (ties: the one giving more fields)."""
    lines = data_lines(sample)[:50]
    if not lines:
        raise SniffError("the sample is empty")
    best, best_score = None, None
    for delimiter in candidates:
        counts = [count_outside_quotes(line, delimiter, quotechar) for line in lines]
        if counts[0] == 0:
            continue
        score = (sum(c == counts[0] for c in counts), counts[0])
        if best_score is None or score > best_score:
            best, best_score = delimiter, score
    if best is None:
        raise SniffError("none of the candidate delimiters occurs in the first line")
    return best


def sniff_quotechar(sample: str, delimiter: str) -> str:
    """'"' unless fields are quoted with "'" more often."""
    votes = {'"': 0, "'": 0}
    for line in data_lines(sample)[:50]:
        for field in line.split(delimiter):
            field = field.strip()
            if len(field) >= 2 and field[0] == field[-1] and field[0] in votes:
                votes[field[0]] += 1
    return "'" if votes["'"] > votes['"'] else '"'


def is_number(text: str) -> bool:
    try:
        float(text.strip())
    except ValueError:
        return False
    return True


def has_header(sample: str, delimiter: str, quotechar: str = '"') -> bool:
    """Vote per column: a numeric column under a non-numeric first cell, or a column of fixed-width
    values under a first cell of another width, says the first row is a header."""
    rows = [split_row(line, delimiter, quotechar) for line in data_lines(sample)[:50]]
    if len(rows) < 2:
        return False
    header, body = rows[0], rows[1:]
    votes = 0
    for col, name in enumerate(header):
        values = [row[col] for row in body if col < len(row)]
        if not values:
            continue
        if all(is_number(v) for v in values):
            votes += -1 if is_number(name) else 1
        else:
            widths = {len(v) for v in values}
            if len(widths) == 1:
                votes += -1 if len(name) in widths else 1
    return votes > 0


def sniff(sample: str, candidates=CANDIDATES) -> Dialect:
    delimiter = sniff_delimiter(sample, candidates)
    quotechar = sniff_quotechar(sample, delimiter)
    if quotechar != '"':
        delimiter = sniff_delimiter(sample, candidates, quotechar)
    return Dialect(delimiter, quotechar, has_header(sample, delimiter, quotechar))
