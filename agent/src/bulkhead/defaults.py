"""Numbers every part of Bulkhead agrees on."""

from __future__ import annotations

# bulkhead-server's default HTTPS port; kept open by the failsafe rules so that a bad
# policy cannot cut an agent off from the store that would fix it.
SERVER_PORT = 7443
