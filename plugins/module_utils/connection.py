# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one connection spec every module and plugin shares (doc fragment: connection)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.basic import env_fallback

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import ENV, BulkheadClient

CONNECTION_SPEC = dict(
    server_url=dict(type="str", required=True, aliases=["url"],
                    fallback=(env_fallback, [ENV["server_url"]])),
    ca_path=dict(type="path", fallback=(env_fallback, [ENV["ca_path"]])),
    client_cert=dict(type="path", fallback=(env_fallback, [ENV["client_cert"]])),
    client_key=dict(type="path", no_log=False, fallback=(env_fallback, [ENV["client_key"]])),
    validate_certs=dict(type="bool", default=True),
    request_timeout=dict(type="float", default=30),
)


def connection_spec():
    """A fresh copy of the spec, to merge into a module's argument_spec."""
    return dict((k, dict(v)) for k, v in CONNECTION_SPEC.items())


def client_from_params(params):
    """A client from module params (or plugin options: any mapping with these keys)."""
    return BulkheadClient(params.get("server_url"), ca_path=params.get("ca_path"),
                          client_cert=params.get("client_cert"),
                          client_key=params.get("client_key"),
                          validate_certs=params.get("validate_certs", True),
                          timeout=params.get("request_timeout") or 30)
