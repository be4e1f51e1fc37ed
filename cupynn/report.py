"""Moved to :mod:`cupynn.paper.report`; this name imports the same module."""

import sys

from .paper import report as _module

sys.modules[__name__] = _module
