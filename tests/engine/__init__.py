"""Tests of backpack_tn.engine."""
