"""Test problems: layer cases as data, ground-truth references and comparators.

This package holds no tests itself. ``tests/`` parametrizes its fixtures over the case
lists (``LINEAR_CASES``, ``CONV_CASES``), computes ground truth with
:mod:`test_problems.references` and compares with
:func:`test_problems.compare.assert_allclose_report`.
"""
