"""tunelab's version: one leaf module, so that the modules that record it (a run's manifest, the config's
resolved copy, the server's /health) need not import the package that imports them."""
__version__ = "0.1.0"
