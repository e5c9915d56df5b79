"""normbench: compare normalization methods on small models from the command line."""

__version__ = "0.1.0"
