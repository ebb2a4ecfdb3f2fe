"""Training: the stages (each defined once), the single-process loop, the DeepSpeed config."""
