"""The Windows dataplanes: the same plan enforced by Windows Firewall with Advanced
Security on the host and by HNS ACL policies on HNS endpoints (docs/windows.md).

Neither backend evaluates rules in order, as Calico does: Windows Firewall has no order
at all (allow-bypass beats block, block beats allow, the profile's default action last),
and HNS orders by priority alone. So the plan is first flattened (`flat`) into one
first-match list of boxes per endpoint and direction, with tiers, Pass, Log, profiles and
failsafes compiled away; each backend then compiles that list into its own rules
(`rules`). What a backend cannot express is refused with `Unsupported`, naming the
policy, rule and field: never widened or narrowed.
"""
