"""Moved to :mod:`cupynn.paper.grid`; this name imports the same module."""

import sys

from .paper import grid as _module

sys.modules[__name__] = _module
