"""Model registry (packaged aliases, hub ids, local folders) and loading for each task."""
from .registry import PACKAGED, resolve

__all__ = ["PACKAGED", "resolve"]
