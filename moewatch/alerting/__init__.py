"""Alerting (issue 4)."""
