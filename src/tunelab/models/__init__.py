"""Model registry (packaged aliases, hub ids, local folders) and loading for each task."""
from .registry import PACKAGED, check_model, hub_id, resolve

__all__ = ["PACKAGED", "check_model", "hub_id", "resolve"]
