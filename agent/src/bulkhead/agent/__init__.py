"""The node agent: sync policy from bulkhead-server, enforce it, keep it, report on it."""
