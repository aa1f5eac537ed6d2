"""minitmpl: a tiny HTML templating engine (variables with filters, if/else, for loops)."""

from .escape import Safe, escape
from .template import Template, TemplateSyntaxError, render

__all__ = ["Safe", "Template", "TemplateSyntaxError", "escape", "render"]
