# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""bulkhead.microseg.policy_preview's controller side: a relative `src` (file or folder)
is looked up as bulkhead.microseg.resource looks up its own."""

from __future__ import annotations

from ansible_collections.bulkhead.microseg.plugins.action.resource import (
    ActionModule as ResourceAction,
)


class ActionModule(ResourceAction):
    pass
