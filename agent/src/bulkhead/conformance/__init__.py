"""The conformance runner: case files run against a dataplane, compared with `expect`."""

from bulkhead.conformance.cases import (
    Case,
    CaseError,
    Probe,
    Refused,
    load_cases,
    parse_case,
    probe_flow,
    wire_flow,
)
from bulkhead.conformance.runner import (
    DATAPLANES,
    CaseResult,
    Dataplane,
    ModelDataplane,
    report_json,
    report_text,
    run_case,
    run_cases,
    run_cases_at_once,
)

__all__ = [
    "DATAPLANES", "Case", "CaseError", "CaseResult", "Dataplane", "ModelDataplane", "Probe",
    "Refused", "load_cases", "parse_case", "probe_flow", "report_json", "report_text",
    "run_case", "run_cases", "run_cases_at_once", "wire_flow",
]
