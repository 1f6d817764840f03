"""Observe: what the host's table decided about real traffic (flow logs)."""
