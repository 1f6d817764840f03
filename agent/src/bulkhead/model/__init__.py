"""Calico projectcalico.org/v3 resources: load, validate, dump."""

from bulkhead.api import KIND_ALIASES
from bulkhead.model.checks import NamedPort, Port, PortRange
from bulkhead.model.errors import LoadError, ValidationError
from bulkhead.model.load import (
    MAX_DOCUMENTS,
    documents,
    dump_json,
    dump_yaml,
    flatten,
    json_value,
    load_paths,
    load_text,
    parse_documents,
    strict_yaml,
)
from bulkhead.model.resources import (
    API_VERSION,
    DEFAULT_ALLOW,
    DEFAULT_ALLOW_PROFILE,
    DEFAULT_TIER,
    DEFAULT_TIER_ORDER,
    EGRESS,
    ENFORCE,
    ENFORCEMENT_LABEL,
    ENFORCEMENT_MODES,
    INGRESS,
    KINDS,
    OBSERVE,
    EndpointPort,
    EntityRule,
    GlobalNetworkPolicy,
    GlobalNetworkSet,
    HostEndpoint,
    ICMPMatch,
    Metadata,
    PolicySpec,
    Profile,
    Resource,
    Rule,
    StagedGlobalNetworkPolicy,
    Tier,
    check_resource_name,
    parse_resource,
)
from bulkhead.model.snapshot import Snapshot, enforceable

__all__ = [
    "API_VERSION", "DEFAULT_ALLOW", "DEFAULT_ALLOW_PROFILE", "DEFAULT_TIER",
    "DEFAULT_TIER_ORDER", "EGRESS", "ENFORCE", "ENFORCEMENT_LABEL", "ENFORCEMENT_MODES",
    "INGRESS", "KINDS", "KIND_ALIASES", "MAX_DOCUMENTS", "OBSERVE",
    "EndpointPort", "EntityRule", "GlobalNetworkPolicy", "GlobalNetworkSet", "HostEndpoint",
    "ICMPMatch", "LoadError", "Metadata", "NamedPort", "PolicySpec", "Port", "PortRange",
    "Profile", "Resource", "Rule", "Snapshot", "StagedGlobalNetworkPolicy", "Tier",
    "ValidationError", "check_resource_name", "documents", "dump_json", "dump_yaml",
    "enforceable", "flatten",
    "json_value", "load_paths", "load_text", "parse_documents", "parse_resource", "strict_yaml",
]
