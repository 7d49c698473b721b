"""ztunnel-py: an eBPF-accelerated, ambient-mode service mesh for Kubernetes."""

__version__ = "0.1.0"
