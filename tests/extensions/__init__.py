"""Tests of backpack_tn.extensions and backpack_tn.use_tn on small networks."""
