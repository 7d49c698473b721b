"""The namespace L7 proxy (waypoint); see README.md.

``routes`` builds the routing view from a snapshot, ``engine`` decides per
request (pure), ``cluster`` picks endpoints under the DestinationRule's
policies, ``authz`` evaluates L7 AuthorizationPolicy.
"""

import ztunnel_py  # noqa: F401 - decides compiled or interpreted per-request modules (native)
