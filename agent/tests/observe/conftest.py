"""The namespace pair of the kernel readers' tests (see netpair.py)."""

from tests.observe.netpair import pair  # noqa: F401
