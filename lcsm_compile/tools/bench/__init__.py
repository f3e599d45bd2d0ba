"""Benchmarks shipped with the package, reachable as `lcsm-compile bench ...`."""
