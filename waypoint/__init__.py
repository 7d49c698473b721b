"""The namespace L7 proxy (waypoint); see README.md. Not built yet."""
