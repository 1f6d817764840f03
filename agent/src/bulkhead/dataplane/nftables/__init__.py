"""The Linux dataplane: render a node's plan as one nftables table and apply it."""

from bulkhead.dataplane.nftables.render import TABLE, render
from bulkhead.dataplane.nftables.ruleset import Chain, NftSet, Ruleset

__all__ = ["TABLE", "Chain", "NftSet", "Ruleset", "render"]
