"""Observe: what the host's table decided about real traffic. The kernel's side is read
here: NFLOG messages (the first packet of each connection and the prefix of each decision
it met, `nflog`) and the connection tracking table with its counters and destroy events
(`conntrack`); `flows` joins them, gives each flow its staged verdict from the reference
evaluator and aggregates records per interval."""
