"""Imports every model's site declarations so `permute.sites` finds them."""

from pqjax.permute import flux_sites  # noqa: F401
