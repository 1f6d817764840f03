# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The manifests filter: YAML or JSON text -> its documents, read as the modules, the server
and the CLI read manifests (not as ansible.builtin.from_yaml_all reads YAML).

Documented in the sidecar file manifests.yml next to this one.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.module_utils import documents


def manifests(text, where="manifests"):
    """The documents of `text`, empty ones skipped and `kind: List` unpacked."""
    if not isinstance(text, (str, bytes)):
        raise AnsibleFilterError("%s: expected YAML or JSON text, not %s"
                                 % (where, type(text).__name__))
    try:
        return documents.flatten(documents.parse_documents(text, where))
    except ValueError as e:
        raise AnsibleFilterError(str(e)) from None


class FilterModule:
    def filters(self):
        return {"manifests": manifests}
