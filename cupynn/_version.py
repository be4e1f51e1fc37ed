"""cupynn's version, in a module of its own so that the modules that record it in files
(model files, run configurations) need not import the package above them, and setup.cfg
reads it without importing cupynn."""

__version__ = "0.1.0"
