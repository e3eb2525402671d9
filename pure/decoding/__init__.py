"""Decoding internals shared by the decode loops (:mod:`pure.engine`, :mod:`pure.jacobi`)."""
