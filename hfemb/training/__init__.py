"""Training: config, collator, loss, trainer, GradCache, distributed helpers, the runner, outputs."""
