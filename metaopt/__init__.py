"""metaopt: functional MAML with differentiable inner optimizers (filled in as modules land)."""

__version__ = "0.1.0"
