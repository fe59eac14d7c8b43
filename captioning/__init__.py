"""Rewrite booru tags into Animagine XL tag order (no torch import here)."""
