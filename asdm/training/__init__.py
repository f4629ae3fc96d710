"""The training side: distillation (A-SDM §IV, BK-SDM §3.2), the trainer command
(``python -m asdm.training CONFIG.toml``) and the embedded model's training. Uses the run-time
engine (``asdm``); the engine never imports it."""
