"""What the kernel says about traffic, read for flow logs: NFLOG messages (the first
packet of each connection and the verdict prefix that logged it, `nflog`) and the
connection tracking table with its counters and destroy events (`conntrack`)."""
