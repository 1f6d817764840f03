# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""bulkhead.microseg.resource's controller side: a relative `src` is looked up as
kubernetes.core.k8s and ansible.builtin.copy look up theirs (the role's files/, the
play's files/, then relative to the playbook), then the module runs as usual."""

from __future__ import annotations

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        src = args.get("src")
        if isinstance(src, str) and src:
            try:
                args["src"] = self._find_needle("files", src)
            except AnsibleError:
                pass  # not found here: the module names the path it cannot read
        result.update(self._execute_module(module_args=args, task_vars=task_vars))
        return result
