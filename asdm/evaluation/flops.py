"""FLOPs per unit, counted on one real forward of the UNet: the bound that speed is compared to.

The counting rule lives in the engine (``asdm.costs``), where Auto Cache budgets with the same
count: convolutions, linear layers and attention matmuls (2 FLOPs per multiply-add); norms and
pointwise ops are left out (they are a few percent and memory-bound)."""
from __future__ import annotations

from ..costs import count, counting  # noqa: F401  (the evaluation's names for the engine's counter)
