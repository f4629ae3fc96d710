"""``python -m asdm.training CONFIG.toml``: the distillation trainer (see README, "Training")."""
import sys

from .trainer import main

sys.exit(main())
