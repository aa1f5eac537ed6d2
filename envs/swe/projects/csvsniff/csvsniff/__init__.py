"""csvsniff: guess a CSV sample's dialect (delimiter, quote character, header row) and read it."""

from .dialect import Dialect, SniffError, has_header, sniff, sniff_delimiter, sniff_quotechar
from .split import count_outside_quotes, read_rows, split_row

__all__ = ["Dialect", "SniffError", "count_outside_quotes", "has_header", "read_rows", "sniff", "sniff_delimiter",
           "sniff_quotechar", "split_row"]
