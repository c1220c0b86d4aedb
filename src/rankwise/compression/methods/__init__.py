"""Factorisation methods, registered by name: svd, asvd, fwsvd, whiten."""

from rankwise.compression.methods.base import Method, MethodOptions, Prepared, Transformed
from rankwise.compression.methods.registry import METHODS, get_method, register

__all__ = ["METHODS", "Method", "MethodOptions", "Prepared", "Transformed", "get_method", "register"]
