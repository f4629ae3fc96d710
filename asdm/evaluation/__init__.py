"""The evaluation side: image metrics and the attribute checker, FLOP counts, the main job's
report. Uses the engine and the training side's dataset; neither imports it."""
