"""Moved to thinktalk/layers/sampler.py (models use it, and models never import engine); this name stays only
until code written against it in flight has moved."""

from ..layers.sampler import *  # noqa: F401,F403
