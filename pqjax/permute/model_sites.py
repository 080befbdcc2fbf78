"""Imports every model's site declarations so `permute.sites` finds them."""

import pqjax.permute.flux_sites
import pqjax.permute.sana_sites
import pqjax.permute.zimage_sites  # noqa: F401
