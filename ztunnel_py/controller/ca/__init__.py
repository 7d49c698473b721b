"""The controller's CA: the signing authority, caller authentication, the gRPC service."""
