"""Moved to :mod:`cupynn.paper.experiments`; this name imports the same module."""

import sys

from .paper import experiments as _module

sys.modules[__name__] = _module
