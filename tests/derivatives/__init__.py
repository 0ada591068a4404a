"""Tests for ``backpack_tn.derivatives``."""
