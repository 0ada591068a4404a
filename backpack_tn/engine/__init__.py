"""Tensor-network engine: index patterns, symbolic networks, evaluation."""
