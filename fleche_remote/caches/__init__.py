"""The composition layer: ``BaseCache``, ``Cache`` and ``CacheStack``."""

from .base import BaseCache
from .cache import Cache
from .stack import CacheStack

__all__ = ["BaseCache", "Cache", "CacheStack"]
