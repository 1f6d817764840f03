"""bulkhead.demo, `make demo`: from an example inventory to enforced microsegmentation on
a lab of hosts (docs/demo.md).

The lab is built from the inventory itself: `ansible-inventory` (with the
`bulkhead.microseg.endpoints` plugin) gives the hosts, their addresses and the port each
one serves; a testbed (bulkhead-server and one bulkhead-agent per host, mTLS) comes up in
lab "demo"; real probes give the truth table before; a real `ansible-playbook` syncs the
host endpoints and applies the policies; real probes give the table after, which is
checked against the reference evaluator on the store's own resources. Everything the
demo makes lives in the lab's namespaces and its state dir, so `bulkhead lab down --name
demo` (`make demo-down`) removes all of it.

Ansible is driven through its command-line tools and documented settings only
(ansible_cli.py); the truth tables are in tables.py, the steps in run.py.
"""


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""
