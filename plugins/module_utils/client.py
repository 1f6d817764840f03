# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""HTTPS client for bulkhead-server over ansible.module_utils.urls (mutual TLS).

Used by modules (on the host that runs them) and by controller-side plugins, so it
needs nothing beyond ansible-core.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import quote, urlencode
from ansible.module_utils.urls import open_url

API_VERSION = "projectcalico.org/v3"

# Server-owned metadata: never part of a comparison or of what a user writes.
SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation")


def resource_path(kind, name=None):
    """/v1/resources/KIND[/NAME], each segment percent-encoded ("." and ".." too, or URL
    normalization would resolve them away)."""
    def segment(value):
        encoded = quote(value, safe="")
        return encoded.replace(".", "%2E") if value and not value.strip(".") else encoded
    return "/v1/resources/" + segment(kind) + ("" if name is None else "/" + segment(name))


class BulkheadError(Exception):
    """Anything that stops a request: the server cannot be reached, or refused."""


class ServerUnreachable(BulkheadError):
    """Network or TLS failure: the server never answered."""


class ApiError(BulkheadError):
    """The server answered with an error; `message` is its text, verbatim."""

    def __init__(self, status, reason, message):
        self.status = status
        self.reason = reason
        self.message = message
        super(ApiError, self).__init__(message)


class NotFound(ApiError):
    """HTTP 404."""


class BulkheadClient:
    """One server and its credentials. Every call returns decoded JSON."""

    def __init__(self, server_url, ca_path=None, client_cert=None, client_key=None,
                 validate_certs=True, timeout=30):
        if not server_url:
            raise BulkheadError("server_url is required (or set BULKHEAD_SERVER)")
        self.server_url = server_url.rstrip("/")
        self.ca_path = ca_path
        self.client_cert = client_cert
        self.client_key = client_key
        self.validate_certs = validate_certs
        self.timeout = timeout

    def request(self, method, path, body=None, query=None, raw=None):
        url = self.server_url + path
        if query:
            url += "?" + urlencode(query)
        if raw is not None:
            data = raw
        elif body is not None:
            data = json.dumps(body)
        else:
            data = None
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            resp = open_url(url, data=data, headers=headers, method=method,
                            timeout=self.timeout, validate_certs=self.validate_certs,
                            ca_path=self.ca_path, client_cert=self.client_cert,
                            client_key=self.client_key, use_proxy=False,
                            http_agent="bulkhead.microseg")
            payload = resp.read()
        except HTTPError as e:
            raise _api_error(e)
        except (URLError, OSError, ValueError) as e:
            raise ServerUnreachable("%s: %s" % (self.server_url, getattr(e, "reason", e)))
        if not payload:
            return None
        return json.loads(payload)

    # ---------------------------------------------------------------- resources
    def get(self, kind, name):
        """The stored document, or None when it does not exist."""
        try:
            return self.request("GET", resource_path(kind, name))
        except NotFound:
            return None

    def list(self, kind=None, selector=None):
        path = resource_path(kind) if kind else "/v1/resources"
        query = {"selector": selector} if selector else None
        return self.request("GET", path, query=query)["items"]

    def create(self, doc, dry_run=False):
        return self.request("POST", resource_path(doc["kind"]), body=doc,
                            query=_dry(dry_run))

    def replace(self, doc, dry_run=False):
        return self.request("PUT", resource_path(doc["kind"], doc["metadata"]["name"]),
                            body=doc, query=_dry(dry_run))

    def delete(self, kind, name, resource_version=None, dry_run=False):
        query = _dry(dry_run) or {}
        if resource_version:
            query["resourceVersion"] = resource_version
        return self.request("DELETE", resource_path(kind, name), query=query or None)

    def delete_many(self, docs, dry_run=False, ignore_not_found=False):
        """All-or-nothing delete of every resource the documents name (kind and
        metadata.name), in one transaction; results say `deleted` or `absent`."""
        query = {}
        if dry_run:
            query["dryRun"] = "true"
        if ignore_not_found:
            query["ignoreNotFound"] = "true"
        return self.request("POST", "/v1/delete", raw=json.dumps(docs), query=query or None)

    def apply(self, docs, dry_run=False, mode="apply"):
        """All-or-nothing apply of several documents; the server's per-resource results."""
        query = {"mode": mode}
        if dry_run:
            query["dryRun"] = "true"
        return self.request("POST", "/v1/apply", raw=json.dumps(docs), query=query)

    # ------------------------------------------------------------------- agents
    def nodes(self, revision=None):
        query = {"revision": str(revision)} if revision is not None else None
        return self.request("GET", "/v1/nodes", query=query)

    def snapshot(self):
        return self.request("GET", "/v1/snapshot")


def _dry(dry_run):
    return {"dryRun": "true"} if dry_run else None


def _api_error(e):
    try:
        text = e.read()
    except Exception:  # pylint: disable=broad-except
        text = b""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    status, reason, message = e.code, getattr(e, "reason", "") or "", text.strip()
    try:
        err = json.loads(text)["error"]
        reason, message = err.get("reason", reason), err.get("message", message)
    except (ValueError, KeyError, TypeError):
        pass
    cls = NotFound if status == 404 else ApiError
    return cls(status, str(reason), message or str(reason) or "HTTP %s" % status)


def strip_server_fields(doc):
    """A deep copy of `doc` without the metadata the server owns."""
    if doc is None:
        return None
    out = json.loads(json.dumps(doc))
    meta = out.get("metadata") or {}
    for key in SERVER_FIELDS:
        meta.pop(key, None)
    return out
