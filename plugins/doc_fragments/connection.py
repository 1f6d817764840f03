# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    """How every module and plugin of bulkhead.microseg reaches bulkhead-server."""

    DOCUMENTATION = r"""
options:
  server_url:
    description:
      - URL of bulkhead-server, for example V(https://bulkhead.example.com:7443).
      - If not set, the environment variable E(BULKHEAD_SERVER) is used.
    type: str
    required: true
    aliases: [url]
  ca_path:
    description:
      - PEM file with the CA that signed the server's certificate (C(bulkhead pki init) writes C(ca.crt)).
      - If not set, E(BULKHEAD_CA) is used, else the system's trust store.
    type: path
  client_cert:
    description:
      - PEM client certificate for mutual TLS; its subject names the caller's role (admin, viewer, agent).
      - If not set, E(BULKHEAD_CERT) is used.
    type: path
  client_key:
    description:
      - PEM private key of O(client_cert).
      - If not set, E(BULKHEAD_KEY) is used.
    type: path
  validate_certs:
    description:
      - Whether to verify the server's certificate. Only set to V(false) on a lab you trust.
    type: bool
    default: true
  request_timeout:
    description:
      - Seconds to wait for each HTTP request, a finite number greater than 0 (V(0) means the default, 30).
    type: float
    default: 30
notes:
  - Set the connection once for all modules with C(module_defaults) and the action group
    C(group/bulkhead.microseg.bulkhead).
"""

    # Controller-side plugins (inventory, lookup) read the same options, also from the
    # environment and, for inventory plugins, from their config file.
    PLUGINS = r"""
options:
  server_url:
    required: false
    env:
      - name: BULKHEAD_SERVER
  ca_path:
    env:
      - name: BULKHEAD_CA
  client_cert:
    env:
      - name: BULKHEAD_CERT
  client_key:
    env:
      - name: BULKHEAD_KEY
"""

    # What every resource module shares: state and labels.
    RESOURCE = r"""
options:
  state:
    description:
      - V(present) creates the resource or updates it to match; V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  labels:
    description:
      - Labels of the resource (C(metadata.labels)), which selectors match.
      - Booleans become V(true) or V(false) and numbers stay as written (V(1), V(2.5)), the
        same rule the P(bulkhead.microseg.endpoints#inventory) inventory plugin follows, so
        V(pci == 'true') finds what either wrote. A null value is an error naming the label.
    type: dict
  purge_labels:
    description:
      - With V(true), labels on the server that are not in O(labels) are removed, except the
        collection's own under C(microseg.bulkhead.io/) (for example the owner label of
        M(bulkhead.microseg.host_endpoints)), as C(purge_tags) keeps C(aws:) tags.
      - With V(false), O(labels) are added to or update the ones on the server, and the others stay.
      - When O(labels) is not given, the labels on the server are kept either way.
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description:
      - Validated by the server (dry run) and compared; nothing is written.
      - A delete is a dry run on the server too, so check mode fails where the real run
        would (a Tier that still holds policies).
  diff_mode:
    support: full
    description: Shows the resource before and after, without server-owned metadata.
"""

    # Every module that only reads.
    READ_ONLY = r"""
attributes:
  check_mode:
    support: full
    description: The module only reads.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
"""

    # Every module that writes: wait until the agents enforce the write.
    WAIT = r"""
options:
  wait:
    description:
      - After a write, wait until the agents enforce the store revision it made (RV(revision)),
        without errors, as M(bulkhead.microseg.agent_status) does with O(bulkhead.microseg.agent_status#module:wait_for_revision).
      - Which agents a change touches is approximated by every agent that has reported its
        status, so the module waits for the whole fleet. An agent that never reported is
        not waited for.
      - Nothing is waited for in check mode or when nothing changed.
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait with O(wait=true) before failing, naming the nodes that lag. The
        write stays; the failed task is changed and returns what it wrote.
      - A value that is not a finite number (V(nan), V(inf)) fails before anything is written.
    type: float
    default: 120
"""
