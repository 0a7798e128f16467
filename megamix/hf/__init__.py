"""Getting models out of (and into) megamix checkpoints."""
