"""Tests of backpack_tn.expressions."""
