#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: export
short_description: Every resource of bulkhead-server (or a tier) at a revision, as a manifest
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Reads every resource (or, with O(tier), that tier and its policies) as it was at store
    revision O(revision), or now, without the metadata the server owns, like C(bulkhead export).
  - With O(dest), writes them as one multi-document YAML file that
    M(bulkhead.microseg.resource) and C(bulkhead apply -f) take back; the task changes
    only when the file's content changes.
options:
  revision:
    description:
      - The store revision to read, for example one from M(bulkhead.microseg.history_info).
        Left out, the current one. A revision older than the history the server keeps fails
        (HTTP 410).
    type: int
  tier:
    description: Only this tier and the policies in it.
    type: str
  dest:
    description:
      - File to write the manifest to, on the host that runs the module. Its directory must
        exist. The file is written as a new temporary file of an unpredictable name in that
        directory, then moved over O(dest) in one step.
    type: path
seealso:
  - module: bulkhead.microseg.rollback
  - module: bulkhead.microseg.history_info
  - module: bulkhead.microseg.resource
extends_documentation_fragment:
  - bulkhead.microseg.connection
attributes:
  check_mode:
    support: full
    description: Reads; with O(dest), reports whether the file would change, and writes nothing.
  diff_mode:
    support: full
    description: With O(dest), the file's content before and after.
"""

EXAMPLES = r"""
- name: Keep the state before a change
  bulkhead.microseg.export:
    dest: "backups/bulkhead-{{ ansible_date_time.iso8601_basic_short }}.yaml"
  delegate_to: localhost
  run_once: true

- name: The platform tier as it was at revision 120
  bulkhead.microseg.export:
    revision: 120
    tier: platform
  delegate_to: localhost
  register: platform_then
"""

RETURN = r"""
revision:
  description: The store revision the resources are read at.
  returned: always
  type: int
  sample: 120
resources:
  description: The resources, without server-owned metadata, dependencies first (tiers before their policies).
  returned: always
  type: list
  elements: dict
dest:
  description: The file written (or, in check mode, that would be).
  returned: with O(dest)
  type: str
"""

import os
import tempfile

from ansible.module_utils.common.text.converters import to_bytes, to_text

from ansible_collections.bulkhead.microseg.plugins.module_utils.documents import dump_documents
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule


def run(module):
    p = module.params
    answer = module.client.export(p["revision"], p["tier"])
    result = {"changed": False, "revision": answer["revision"], "resources": answer["items"]}
    if not p["dest"]:
        return result
    text = "# bulkhead export: revision %s%s\n" % (
        answer["revision"], ", tier %s" % p["tier"] if p["tier"] else "")
    text += dump_documents(answer["items"]) if answer["items"] else ""
    dest = p["dest"]
    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.isdir(dest):
        raise ValueError("dest: %s is a directory: give the path of the file to write" % dest)
    if not os.path.isdir(folder):
        raise ValueError("dest: %s: its directory %s does not exist" % (dest, folder))
    before = None
    if os.path.exists(dest):
        try:
            with open(dest, "rb") as f:
                before = to_text(f.read())
        except (IOError, OSError) as e:
            raise ValueError("dest: %s: cannot be read: %s" % (dest, e))
    result["dest"] = dest
    if before != text:
        result["changed"] = True
        result["diff"] = {"before": before or "", "after": text,
                          "before_header": p["dest"], "after_header": p["dest"]}
        if not module.check_mode:
            write(module, dest, folder, to_bytes(text))
    return result


def write(module, dest, folder, data):
    """`data` into a new file of a name no one can guess or plant beforehand (mkstemp, in
    dest's directory, mode 0600), then moved over dest in one step."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(dest), suffix=".tmp",
                                   dir=folder)
    except (IOError, OSError) as e:
        raise ValueError("dest: %s: cannot write in %s: %s" % (dest, folder, e))
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except (IOError, OSError) as e:
            raise ValueError("dest: %s: cannot write %s: %s" % (dest, tmp, e))
        module.atomic_move(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main():
    module = BulkheadModule(dict(revision=dict(type="int"), tier=dict(type="str"),
                                 dest=dict(type="path")))
    module.run(lambda: run(module))


if __name__ == "__main__":
    main()
