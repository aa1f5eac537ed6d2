"""semverlite: Semantic Versioning 2.0.0 versions (parse, compare, bump) and npm-style ranges."""

from .ranges import max_satisfying, satisfies
from .version import InvalidVersion, Version

__all__ = ["InvalidVersion", "Version", "max_satisfying", "satisfies"]
