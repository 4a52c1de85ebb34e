"""Prometheus exporter (issue 3)."""
