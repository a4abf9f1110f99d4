"""Prefect layer: thin over mip_core (see the package docstrings)."""
