"""Tests for ``backpack_tn``, mirroring the package layout."""
