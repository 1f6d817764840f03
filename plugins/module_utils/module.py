# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The module wrapper (kubernetes.core's "AnsibleK8SModule"): connection options, errors."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import math

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    ApiError,
    BulkheadError,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.connection import (
    client_from_params,
    connection_spec,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.service import (
    ResourceService,
    make_resource,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import (
    NotConverged,
    wait_for_write,
    wait_spec,
)

RESOURCE_SPEC = dict(
    state=dict(type="str", default="present", choices=["present", "absent"]),
    labels=dict(type="dict"),
    purge_labels=dict(type="bool", default=True),
)


def resource_spec():
    """The typed modules' shared options: state, labels, purge_labels, wait, wait_timeout."""
    spec = dict((k, dict(v)) for k, v in RESOURCE_SPEC.items())
    spec.update(wait_spec())
    return spec


class BulkheadModule(AnsibleModule):
    """An AnsibleModule with the shared connection options and a client to the server."""

    def __init__(self, argument_spec, **kwargs):
        spec = connection_spec()
        spec.update(argument_spec)
        kwargs.setdefault("supports_check_mode", True)
        super(BulkheadModule, self).__init__(argument_spec=spec, **kwargs)
        self._client = None
        if "wait_timeout" in self.params:
            # Checked before anything is written: after the write would be too late.
            self.seconds("wait_timeout")

    @property
    def client(self):
        if self._client is None:
            self._client = client_from_params(self.params)
        return self._client

    @property
    def service(self):
        return ResourceService(self.client)

    def order(self, option="order"):
        """The `order` option as users write it (100, not 100.0); a value that is not a
        finite number (inf, nan) fails naming the option."""
        value = self.params.get(option)
        if value is None:
            return None
        if not math.isfinite(value):
            self.fail_json(msg="%s: %s is not a number a policy or tier can be ordered by: "
                               "give a finite number" % (option, value))
        return int(value) if value == int(value) else value

    def seconds(self, option):
        """The option as seconds to wait; a value that is not a finite number (nan, inf)
        fails naming the option: the wait compares the time spent with it, and neither
        ever ends one (nan is never reached)."""
        value = self.params.get(option)
        if value is not None and not math.isfinite(value):
            self.fail_json(msg="%s: %s is not a number of seconds a wait can end after: give "
                               "a finite number" % (option, value))
        return value

    def make_resource(self, kind, name, spec, labels=None):
        """The v3 document from the module's options; a bad label value fails naming it."""
        try:
            return make_resource(kind, name, spec, labels)
        except ValueError as e:
            self.fail_json(msg=str(e))

    def run(self, func):
        """Call `func()` (returning the result dict) and exit; server errors fail verbatim.

        A write module (one with the `wait` option) then waits, when asked, until the
        agents enforce the revision it wrote."""
        try:
            result = func()
        except NotConverged as e:
            self.fail_json(msg=str(e), revision=e.result.get("revision"),
                           nodes=e.result.get("nodes"), missing=e.result.get("missing"))
        except ApiError as e:
            # The server's message names the resource and field: pass it on as it is.
            self.fail_json(msg=e.message, status=e.status, reason=e.reason)
        except (BulkheadError, ValueError) as e:
            self.fail_json(msg=str(e))
        if not self._diff:
            result.pop("diff", None)
        if "wait" in self.params:
            try:
                result = wait_for_write(self, result)
            except BulkheadError as e:
                self.fail_after_write(result, e)
        self.exit_json(**result)

    def fail_after_write(self, result, error):
        """The wait after a write failed (agents not converged in time, the server gone):
        the write stays, so the task fails as changed, with what it wrote, saying so."""
        out = dict(result)
        out["changed"] = True
        if isinstance(error, NotConverged):
            out.update(nodes=error.result.get("nodes"), missing=error.result.get("missing"))
            why = str(error)
        elif isinstance(error, ApiError):
            out.update(status=error.status, reason=error.reason)
            why = error.message
        else:
            why = str(error)
        out["msg"] = ("written at revision %s, which stays: the change is in the store, "
                      "but waiting for the agents to enforce it failed: %s. `bulkhead nodes "
                      "--revision %s` shows which agent lags and why; a node gone for good "
                      "holds every wait until `bulkhead delete node NAME`"
                      % (result.get("revision"), why, result.get("revision")))
        self.fail_json(**out)
