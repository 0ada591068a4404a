"""Tests for ``backpack_tn.benchmark``."""
