"""Moved to thinktalk/layers/kv_cache.py (models use it, and models never import engine); this name stays only
until code written against it in flight has moved."""

from ..layers.kv_cache import *  # noqa: F401,F403
