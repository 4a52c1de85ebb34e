"""Callbacks for the frameworks people train with. Each module imports its framework lazily: importing
``moewatch.integrations.transformers`` works without transformers installed (the callback then cannot be
used with a Trainer, but nothing breaks at import time)."""

__all__: list[str] = []
