"""bulkhead.testbed: the whole system on one machine. A lab (`bulkhead.lab`) with
bulkhead-server in its switch namespace and a bulkhead-agent in every host, mutual TLS
from `bulkhead pki`. It sits on top of the lab, the server's PKI, the agent and the
client; nothing below imports it.

    from bulkhead.testbed import Testbed
    with Testbed("t1", 3) as bed:
        bed.enforce(docs, marker="step1")
        bed.lab.probe("h1", "h2", "tcp", 80)
"""

from bulkhead.testbed.testbed import BIN, MANAGEMENT, Testbed

__all__ = ["BIN", "MANAGEMENT", "Testbed"]
