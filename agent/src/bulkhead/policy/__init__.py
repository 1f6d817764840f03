"""Policy evaluation: which policies apply, the verdict for a flow, and why."""

from bulkhead.policy.evaluate import DirectionVerdict, Evaluator, Step, Verdict
from bulkhead.policy.failsafe import DEFAULT_INBOUND, DEFAULT_OUTBOUND, FailsafePort, Failsafes
from bulkhead.policy.flow import Flow, protocol_name, protocol_of

__all__ = [
    "DEFAULT_INBOUND", "DEFAULT_OUTBOUND", "DirectionVerdict", "Evaluator", "FailsafePort",
    "Failsafes", "Flow", "Step", "Verdict", "protocol_name", "protocol_of",
]
