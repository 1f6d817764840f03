"""The Host Compute Network (HCN) API, as much of it as the HNS enforcer needs: list the
host's HNS endpoints with their addresses, read one endpoint's properties (its JSON,
holding its policies), modify one endpoint with a request (JSON).

`Hcn` is the boundary (the protocol the enforcer takes); `ComputeNetwork` implements it
over ctypes to computenetwork.dll. The functions, their arguments and the memory rule are
those hcsshim's `hcn` package declares and uses (hcn/hcn.go: `HcnEnumerateEndpoints(query,
*endpoints, *result)`, `HcnOpenEndpoint(*guid, *handle, *result)`,
`HcnQueryEndpointProperties(handle, query, *properties, *result)`,
`HcnModifyEndpoint(handle, settings, *result)`, `HcnCloseEndpoint(handle)`, each
returning an HRESULT; hcn/hcnendpoint.go: the calls' order, the query
`{"SchemaVersion": {"Major": 2, "Minor": 0}}`, the endpoint JSON's `ID`, `Name`,
`IpConfigurations[].IpAddress`, `Policies`; strings are UTF-16 and the strings HCN
returns, results and error records alike, are freed with CoTaskMemFree, as hcsshim's
interop.ConvertAndFreeCoTaskMemString does). A GUID is passed as its 16 bytes in
Windows' layout (`uuid.UUID.bytes_le`).

The module imports anywhere; the DLL is loaded only on Windows, when a ComputeNetwork is
made. Not run here: there is no Windows host; tests use tests/hcnfake.py.
"""

from __future__ import annotations

import ctypes
import json
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

QUERY = json.dumps({"SchemaVersion": {"Major": 2, "Minor": 0}})
MAX_ENDPOINTS = 10_000
MAX_JSON = 64 << 20      # characters of one answer kept


class HcnError(Exception):
    """An HCN call failed (or HCN is not there); names the call and the endpoint."""


@dataclass(frozen=True)
class HnsEndpoint:
    id: str                          # the GUID, lower case
    name: str                        # HCN's Name (set by whoever made the endpoint)
    addresses: tuple[str, ...]       # its IpConfigurations' addresses


class Hcn(Protocol):
    def endpoints(self) -> list[HnsEndpoint]: ...     # every HNS endpoint of the host
    def query(self, endpoint: str) -> str: ...         # the endpoint's properties JSON
    def modify(self, endpoint: str, request: str) -> None: ...   # one HcnModifyEndpoint


def parse_endpoint(properties: str | dict[str, Any]) -> HnsEndpoint:
    """An endpoint's id, name and addresses from its properties JSON."""
    doc: Any = properties
    if isinstance(properties, str):
        try:
            doc = json.loads(properties)
        except ValueError as e:
            raise HcnError(f"endpoint properties: not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ID"), str):
        raise HcnError(f"endpoint properties: no string ID in {str(doc)[:120]!r}")
    configs = doc.get("IpConfigurations") or []
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise HcnError(f"endpoint {doc['ID']}: IpConfigurations: not a list of objects")
    addresses = tuple(str(c["IpAddress"]) for c in configs if c.get("IpAddress"))
    return HnsEndpoint(doc["ID"].lower(), str(doc.get("Name", "")), addresses)


def acl_policies(properties: str) -> list[dict[str, Any]]:
    """The endpoint's ACL policies exactly as HCN gave them (to put them back)."""
    try:
        doc = json.loads(properties)
    except ValueError as e:
        raise HcnError(f"endpoint properties: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HcnError("endpoint properties: not an object")
    policies = doc.get("Policies") or []
    if not isinstance(policies, list):
        raise HcnError("endpoint properties: Policies is not a list")
    return [p for p in policies if isinstance(p, dict) and p.get("Type") == "ACL"]


def _guid(endpoint: str) -> bytes:
    try:
        return uuid.UUID(endpoint).bytes_le
    except ValueError:
        raise HcnError(f"endpoint {endpoint!r}: not a GUID") from None


class ComputeNetwork:
    """`Hcn` over computenetwork.dll (see the module). Raises HcnError("HCN is only on
    Windows") when made elsewhere."""

    def __init__(self) -> None:
        if sys.platform != "win32":
            raise HcnError("HCN is only on Windows (computenetwork.dll); this is "
                           f"{sys.platform}")
        try:
            dll: Any = ctypes.WinDLL("computenetwork.dll")
            self._free: Any = ctypes.WinDLL("ole32.dll").CoTaskMemFree
        except OSError as e:
            raise HcnError(f"cannot load computenetwork.dll: {e}") from None
        out = ctypes.POINTER(ctypes.c_void_p)
        handle, text = ctypes.c_void_p, ctypes.c_wchar_p
        self._free.argtypes, self._free.restype = [ctypes.c_void_p], None
        self._api: dict[str, Any] = {}
        for name, args in (("HcnEnumerateEndpoints", [text, out, out]),
                           ("HcnOpenEndpoint", [ctypes.c_char_p, out, out]),
                           ("HcnQueryEndpointProperties", [handle, text, out, out]),
                           ("HcnModifyEndpoint", [handle, text, out]),
                           ("HcnCloseEndpoint", [handle])):
            try:
                function = getattr(dll, name)
            except AttributeError:
                raise HcnError(f"computenetwork.dll has no {name} (HCN v2 needs Windows "
                               "Server 2019 or later)") from None
            function.argtypes, function.restype = args, ctypes.c_long   # HRESULT
            self._api[name] = function

    def _take(self, pointer: ctypes.c_void_p) -> str:
        """The UTF-16 string HCN returned, freed."""
        if not pointer.value:
            return ""
        try:
            return ctypes.wstring_at(pointer.value)[:MAX_JSON]
        finally:
            self._free(pointer)

    def _call(self, name: str, what: str, *args: Any) -> None:
        result = ctypes.c_void_p()
        hr = self._api[name](*args, ctypes.byref(result))
        record = self._take(result)
        if hr < 0:
            raise HcnError(f"{name} ({what}): HRESULT 0x{hr & 0xFFFFFFFF:08X}"
                           + (f": {record[:2000]}" if record else ""))

    def _open(self, endpoint: str) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        self._call("HcnOpenEndpoint", f"endpoint {endpoint}", _guid(endpoint),
                   ctypes.byref(handle))
        return handle

    def _close(self, handle: ctypes.c_void_p) -> None:
        self._api["HcnCloseEndpoint"](handle)

    def ids(self) -> list[str]:
        found = ctypes.c_void_p()
        self._call("HcnEnumerateEndpoints", "the host's endpoints", QUERY, ctypes.byref(found))
        try:
            listed = json.loads(self._take(found) or "[]")
        except ValueError as e:
            raise HcnError(f"HcnEnumerateEndpoints: not JSON: {e}") from None
        if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
            raise HcnError("HcnEnumerateEndpoints: not a list of GUIDs")
        if len(listed) > MAX_ENDPOINTS:
            raise HcnError(f"HcnEnumerateEndpoints: more than {MAX_ENDPOINTS} endpoints")
        return [i.lower() for i in listed]

    def endpoints(self) -> list[HnsEndpoint]:
        return [parse_endpoint(self.query(i)) for i in self.ids()]

    def query(self, endpoint: str) -> str:
        handle = self._open(endpoint)
        try:
            found = ctypes.c_void_p()
            self._call("HcnQueryEndpointProperties", f"endpoint {endpoint}", handle, QUERY,
                       ctypes.byref(found))
            return self._take(found)
        finally:
            self._close(handle)

    def modify(self, endpoint: str, request: str) -> None:
        handle = self._open(endpoint)
        try:
            self._call("HcnModifyEndpoint", f"endpoint {endpoint}", handle, request)
        finally:
            self._close(handle)

