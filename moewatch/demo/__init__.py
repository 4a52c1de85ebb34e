"""The demo MoE and its training loop (``moewatch demo``)."""
