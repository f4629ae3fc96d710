"""``python -m asdm.training CONFIG.toml``: the distillation trainer (see docs/training.md)."""
import sys

from .trainer import main

sys.exit(main())
