"""ztunnel-py: an eBPF-accelerated, ambient-mode service mesh for Kubernetes."""

from ztunnel_py import native as _native

__version__ = "0.1.0"

_native.select()  # compiled or interpreted hot modules: before any of them is imported
