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
import math
import os
import socket
import time

from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import urlencode, urlsplit
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import open_url

from ansible_collections.bulkhead.microseg.plugins.module_utils.api import (
    SERVER_FIELDS,
    resource_path,
    route,
)


# Connection option -> its environment variable (the `bulkhead` CLI reads the same ones).
ENV = {
    "server_url": "BULKHEAD_SERVER",
    "ca_path": "BULKHEAD_CA",
    "client_cert": "BULKHEAD_CERT",
    "client_key": "BULKHEAD_KEY",
}

# The largest answer read, in bytes: far above any real one (an export of 10,000
# resources is about 10 MB; a preview stops at 64 MiB of groups), below what would
# exhaust the memory of the host that runs the module.
MAX_ANSWER_BYTES = 128 * 1024 * 1024
# The largest error answer read (the server's are a few hundred bytes).
MAX_ERROR_BYTES = 1024 * 1024
_CHUNK = 64 * 1024

# What each file option holds, for messages about it.
FILE_OPTIONS = (
    ("ca_path", "the CA certificate that signed the server's certificate"),
    ("client_cert", "the client certificate (PEM) the server knows the caller by"),
    ("client_key", "the private key (PEM) of client_cert"),
)


def option(name):
    """`client_cert (BULKHEAD_CERT)`: how a message names a connection option."""
    return "%s (%s)" % (name, ENV[name])


class BulkheadError(Exception):
    """Anything that stops a request: the server cannot be reached, or refused."""


class ServerUnreachable(BulkheadError):
    """Network or TLS failure: the server never answered."""


class ConnectionSettingsError(BulkheadError):
    """The connection options cannot work (a file missing, a URL with a path): nothing was
    sent."""


class ApiError(BulkheadError):
    """The server answered with an error; `message` is its text, verbatim."""

    def __init__(self, status, reason, message):
        self.status = status
        self.reason = reason
        self.message = message
        super(ApiError, self).__init__(message)


class NotFound(ApiError):
    """HTTP 404."""


class AnswerRefused(BulkheadError):
    """The server answered, but not as bulkhead-server answers: a redirect, an answer
    too large or too slow, not JSON, or JSON of the wrong shape. Nothing of it is used."""


NULL = type(None)
NUMBER = (int, float)
_TYPE_NAMES = ((bool, "a boolean"), (dict, "a mapping"), (list, "a list"), (str, "a string"),
               (int, "an integer"), (float, "a number"), (NULL, "null"))

# The shapes of the server's answers, as the collection reads them: a mapping with at
# least these keys (a key ending in `?` may be missing), a list whose elements all have
# one shape, a type, or a tuple of types (one of which may be a mapping's shape).
RESOURCE = {"kind": str, "metadata": {"name": str}, "spec?": dict}
RESULTS = {"results": [{"kind": str, "name": str, "action": str,
                        "before?": (dict, NULL), "after?": (dict, NULL)}],
           "revision?": (int, NULL)}
VERDICT = {"action": str, "after?": (dict, NULL)}
EXPORT = {"revision": int, "items": [RESOURCE]}
NODES = {"nodes": [{"node": str}], "revision?": (int, NULL)}
COUNTS = {"records": NUMBER, "connections": NUMBER}
PREVIEW = {"totals": {"newlyDenied": COUNTS, "undecided": COUNTS},
           "protected?": ({"records": NUMBER, "connections": NUMBER, "selector": str}, NULL)}


def _kind_of(value):
    for cls, name in _TYPE_NAMES:
        if isinstance(value, cls):
            return name
    return type(value).__name__


def _expected(types):
    names = dict(_TYPE_NAMES)
    return " or ".join("a mapping" if isinstance(cls, dict) else names.get(cls, cls.__name__)
                       for cls in types)


def shape_problem(value, shape, where="the answer"):
    """What in `value` does not have `shape` (see RESOURCE), or None when all of it does."""
    if isinstance(shape, tuple):
        for option in shape:
            if isinstance(option, dict) and isinstance(value, dict):
                return shape_problem(value, option, where)
        plain = tuple(t for t in shape if not isinstance(t, dict))
        if isinstance(value, plain) and (bool in plain or not isinstance(value, bool)):
            return None
        return "%s: expected %s, found %s" % (where, _expected(shape), _kind_of(value))
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return "%s: expected a mapping, found %s" % (where, _kind_of(value))
        for key, sub in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return "%s: has no %s" % (where, name)
            problem = shape_problem(value[name], sub, "%s.%s" % (where, name))
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return "%s: expected a list, found %s" % (where, _kind_of(value))
        for i, item in enumerate(value):
            problem = shape_problem(item, shape[0], "%s[%d]" % (where, i))
            if problem:
                return problem
        return None
    return shape_problem(value, (shape,), where)


def read_bounded(resp, url, deadline, limit, timeout):
    """The body of `resp`, read in pieces until its end: AnswerRefused past `limit` bytes
    or once the `deadline` (time.monotonic()) has passed, so a server that sends a byte a
    second cannot keep the caller waiting for longer than the request's timeout."""
    length = None
    headers = getattr(resp, "headers", None)
    if headers is not None:
        try:
            length = int(headers.get("Content-Length"))
        except (TypeError, ValueError):
            length = None
    if length is not None and length > limit:
        raise AnswerRefused("%s: the answer is %d bytes, more than the %d the collection reads "
                            "(MAX_ANSWER_BYTES); nothing of it was read" % (url, length, limit))
    read = getattr(resp, "read1", None) or resp.read
    parts, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise AnswerRefused("%s: the answer did not arrive whole within %s seconds "
                                "(request_timeout): %d bytes in that time"
                                % (url, timeout, size))
        part = read(_CHUNK)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > limit:
            raise AnswerRefused("%s: the answer is more than %d bytes (MAX_ANSWER_BYTES); the "
                                "rest was not read" % (url, limit))
        parts.append(part)


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
        self._checked = False

    def check_settings(self):
        """Fail with the option, the value and what to do when the settings cannot work."""
        parts = urlsplit(self.server_url)
        where = "%s: %s" % (option("server_url"), self.server_url)
        if parts.scheme == "http":
            raise ConnectionSettingsError(
                "%s: bulkhead-server speaks HTTPS only (mutual TLS): use https://" % where)
        if parts.scheme != "https" or not parts.hostname:
            raise ConnectionSettingsError(
                "%s: expected https://HOST:PORT, for example https://bulkhead.example.com:7443"
                % where)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConnectionSettingsError(
                "%s: has a path (%s): give only https://HOST:PORT; the API's paths (/v1/...) "
                "are added to it, so with a path every request misses (404)"
                % (where, parts.path or "?" + parts.query))
        for name, what in FILE_OPTIONS:
            path = getattr(self, name)
            if not path:
                continue
            if not os.path.exists(path):
                raise ConnectionSettingsError("%s: %s: no such file; it should hold %s"
                                              % (option(name), path, what))
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ConnectionSettingsError("%s: %s: not a readable file; it should hold %s"
                                              % (option(name), path, what))
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or \
                not math.isfinite(self.timeout) or self.timeout <= 0:
            # The socket refuses these with messages that name no option (nan: "Invalid
            # value NaN", a negative: "Timeout value out of range"), inf with OverflowError.
            raise ConnectionSettingsError("request_timeout: %s: give a number of seconds "
                                          "greater than 0" % (self.timeout,))
        if self.client_key and not self.client_cert:
            raise ConnectionSettingsError("%s is set (%s) but %s is not: give both"
                                          % (option("client_key"), self.client_key,
                                             option("client_cert")))
        self._checked = True

    def explain(self, error):
        """A failed connection's likely cause, naming the option and path involved."""
        inner = getattr(error, "reason", None)
        inner = inner if isinstance(inner, BaseException) else error
        text = str(inner)
        cert, key, ca = self.client_cert, self.client_key, self.ca_path
        if "KEY_VALUES_MISMATCH" in text:
            return ("%s: %s is not the private key of %s: %s (KEY_VALUES_MISMATCH); give the "
                    "key issued with that certificate"
                    % (option("client_key"), key, option("client_cert"), cert))
        if "NO_CERTIFICATE_OR_CRL_FOUND" in text:
            return ("%s: %s holds no PEM certificate (%s); give the CA certificate, for "
                    "example the ca.crt `bulkhead pki init` wrote" % (option("ca_path"), ca, text))
        if "PEM lib" in text or "NO_START_LINE" in text:
            return ("%s: %s or %s: %s is not a PEM certificate and key (%s)"
                    % (option("client_cert"), cert, option("client_key"), key or cert, text))
        if "CERTIFICATE_VERIFY_FAILED" in text:
            for words in ("has expired", "is not yet valid"):
                if "certificate " + words in text:
                    return ("the server's certificate (or the CA that issued it) %s (%s): renew "
                            "it, or check this machine's clock" % (words, text))
            if "mismatch" in text:
                return ("the server's certificate is not issued for %s (%s): use the host "
                        "name or address it was issued for in %s"
                        % (urlsplit(self.server_url).hostname, text, option("server_url")))
            trust = "%s: %s" % (option("ca_path"), ca) if ca else \
                "the system's trust store (%s is not set)" % option("ca_path")
            return ("the server's certificate is not signed by the CA in %s (%s); give the CA "
                    "that issued the server's certificate" % (trust, text))
        lowered = text.lower()
        if isinstance(inner, ConnectionResetError) or "remote end closed" in lowered or \
                "alert" in lowered or "eof occurred" in lowered:
            if not cert:
                return ("the server closed the connection: it requires a client certificate "
                        "(mutual TLS) and none was given: set %s and %s"
                        % (option("client_cert"), option("client_key")))
            return ("the server closed the connection without an answer: it most likely "
                    "rejected the client certificate %s: %s (not issued by the server's client "
                    "CA, expired or revoked) [%s]" % (option("client_cert"), cert, text))
        if isinstance(inner, ConnectionRefusedError):
            return ("nothing accepts connections at %s (connection refused): is bulkhead-server "
                    "running, and is the port in %s right?"
                    % (urlsplit(self.server_url).netloc, option("server_url")))
        if isinstance(inner, socket.gaierror):
            return ("cannot resolve %s (%s): check %s"
                    % (urlsplit(self.server_url).hostname, text, option("server_url")))
        if isinstance(inner, socket.timeout) or "timed out" in lowered:
            return "no answer within %s seconds (request_timeout)" % self.timeout
        return text

    def request(self, method, path, body=None, query=None, raw=None):
        if not self._checked:
            self.check_settings()
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
        # The whole request, not each read, is bounded by the timeout.
        deadline = time.monotonic() + self.timeout
        try:
            # No redirect is followed: bulkhead-server sends none, and one followed would
            # take the request (and the trust in its answer) elsewhere, even to http://.
            resp = open_url(url, data=data, headers=headers, method=method,
                            timeout=self.timeout, validate_certs=self.validate_certs,
                            ca_path=self.ca_path, client_cert=self.client_cert,
                            client_key=self.client_key, use_proxy=False,
                            http_agent="bulkhead.microseg", follow_redirects="none")
            try:
                payload = read_bounded(resp, url, deadline, MAX_ANSWER_BYTES, self.timeout)
            finally:
                resp.close()
        except HTTPError as e:
            if 300 <= e.code < 400:
                where = (e.headers.get("Location") if e.headers is not None else None) or \
                    "(no Location)"
                raise AnswerRefused("%s %s: the server answered %s, a redirect to %s: "
                                    "redirects are not followed; give the server's own "
                                    "address in %s" % (method, url, e.code, where,
                                                       option("server_url")))
            raise _api_error(e, url, deadline, self.timeout)
        except (URLError, OSError, ValueError, UrlsConnectionError) as e:
            raise ServerUnreachable("%s: %s" % (self.server_url, self.explain(e)))
        if not payload:
            return None
        try:
            return json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise AnswerRefused("%s %s: the answer is not JSON (%s): %r" % (
                method, url, e, payload[:80]))

    def call(self, method, path, shape, body=None, query=None, raw=None):
        """`request`, and AnswerRefused naming the URL unless the answer has `shape` (see
        RESOURCE): the methods below read the server through it, so what the modules take
        from an answer is there, of the type they use."""
        answer = self.request(method, path, body=body, query=query, raw=raw)
        problem = shape_problem(answer, shape)
        if problem:
            url = self.server_url + path + ("?" + urlencode(query) if query else "")
            raise AnswerRefused("%s %s: not an answer bulkhead-server gives: %s"
                                % (method, url, problem))
        return answer

    # ---------------------------------------------------------------- resources
    def get(self, kind, name):
        """The stored document, or None when it does not exist."""
        try:
            return self.call("GET", resource_path(kind, name), RESOURCE)
        except NotFound:
            return None

    def list(self, kind=None, selector=None):
        path = resource_path(kind) if kind else route("resources")
        query = {"selector": selector} if selector else None
        return self.call("GET", path, {"items": [RESOURCE]}, query=query)["items"]

    def create(self, doc, dry_run=False):
        return self.call("POST", resource_path(doc["kind"]), VERDICT if dry_run else RESOURCE,
                         body=doc, query=_dry(dry_run))

    def replace(self, doc, dry_run=False):
        return self.call("PUT", resource_path(doc["kind"], doc["metadata"]["name"]),
                         VERDICT if dry_run else RESOURCE, body=doc, query=_dry(dry_run))

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
        return self.call("POST", route("delete"), RESULTS, raw=json.dumps(docs),
                         query=query or None)

    def apply(self, docs, dry_run=False, mode="apply"):
        """All-or-nothing apply of several documents; the server's per-resource results."""
        query = {"mode": mode}
        if dry_run:
            query["dryRun"] = "true"
        return self.call("POST", route("apply"), RESULTS, raw=json.dumps(docs), query=query)

    def sync(self, docs, tier=None, owner=None, dry_run=False, kind=None, label=None,
             adopt=False, preconditions=False):
        """The policies `docs` become exactly those of a tier or an owner (one transaction);
        with `kind="HostEndpoint"` an owner's host endpoints, `label` the owner's label,
        `adopt` taking over the body's resources another owner has, `preconditions` each
        document's resourceVersion, where it has one, a precondition (409 otherwise)."""
        query = {"tier": tier} if tier is not None else {"owner": owner}
        if kind is not None:
            query["kind"] = kind
        if label is not None:
            query["label"] = label
        if adopt:
            query["adopt"] = "true"
        if preconditions:
            query["preconditions"] = "true"
        if dry_run:
            query["dryRun"] = "true"
        return self.call("POST", route("sync"), RESULTS, raw=json.dumps(docs), query=query)

    def rollback(self, revision, dry_run=False):
        """Every resource back to revision `revision` (what came later deleted)."""
        query = {"revision": str(revision)}
        if dry_run:
            query["dryRun"] = "true"
        return self.call("POST", route("rollback"), RESULTS, query=query)

    def export(self, revision=None, tier=None):
        """Every resource (or a tier and its policies) as it was at `revision` (or now)."""
        query = {}
        if revision is not None:
            query["revision"] = str(revision)
        if tier is not None:
            query["tier"] = tier
        return self.call("GET", route("export"), EXPORT, query=query or None)

    def history(self, limit=None, kind=None, name=None):
        """Who changed what at which revision, newest first, and whether the server left
        older entries out (its bound on the changes of one answer): (entries, truncated)."""
        query = {}
        for key, value in (("limit", limit), ("kind", kind), ("name", name)):
            if value is not None:
                query[key] = str(value)
        answer = self.call("GET", route("history"), {"entries": [dict]}, query=query or None)
        return answer["entries"], answer.get("truncated") is True

    def flows(self, query=None):
        """Flow log records, or top talkers with `top` (`GET /v1/flows`; query values are
        strings, as the server reads them)."""
        shape = {"top": [dict]} if query and "top" in query else {"flows": [dict]}
        return self.call("GET", route("flows"), shape, query=query or None)

    def dns(self, query=None):
        """DNS log records (`GET /v1/dns`; query values are strings)."""
        return self.call("GET", route("dns"), {"dns": [dict]}, query=query or None)

    def promote(self, names, dry_run=False, versions=None):
        """The StagedGlobalNetworkPolicies `names` take effect, their staged copies
        deleted, in one transaction (`POST /v1/promote`); an unknown name: 404. `versions`
        (name: resourceVersion) pins some: one at another version, 409."""
        body = {"names": list(names), "dryRun": bool(dry_run)}
        if versions:
            body["resourceVersions"] = dict(versions)
        return self.call("POST", route("promote"), RESULTS, body=body)

    def preview(self, body):
        """Which stored flows the proposed state would decide differently
        (`POST /v1/preview`; `body` as the server reads it)."""
        return self.call("POST", route("preview"), PREVIEW, body=body)

    # ------------------------------------------------------------------- agents
    def nodes(self, revision=None):
        query = {"revision": str(revision)} if revision is not None else None
        return self.call("GET", route("nodes"), NODES, query=query)

    def snapshot(self):
        return self.call("GET", route("snapshot"), dict)


def _dry(dry_run):
    return {"dryRun": "true"} if dry_run else None


def _api_error(e, url, deadline, timeout):
    try:
        text = read_bounded(e, url, deadline, MAX_ERROR_BYTES, timeout)
    except Exception:  # pylint: disable=broad-except
        text = b""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    status, reason, message = e.code, getattr(e, "reason", "") or "", text.strip()
    try:
        err = json.loads(text)["error"]
        reason, message = err.get("reason", reason), err.get("message", message)
    except (ValueError, KeyError, TypeError, AttributeError):
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
