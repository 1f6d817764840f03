"""Bulkhead: Calico-style, label-based microsegmentation for any Ansible-managed host."""

__version__ = "0.1.0"
