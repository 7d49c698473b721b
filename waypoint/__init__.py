"""The namespace L7 proxy (waypoint); see README.md.

``routes`` builds the routing view from a snapshot, ``engine`` decides per
request (pure), ``cluster`` picks endpoints under the DestinationRule's
policies, ``authz`` evaluates L7 AuthorizationPolicy.
"""

from waypoint import native as _native

_native.select()  # compiled or interpreted per-request modules: before any is imported
