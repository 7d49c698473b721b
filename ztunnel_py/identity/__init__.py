"""Workload identity: keys, CSRs, certificates, rotation, SPIFFE checks, TLS contexts.

Private keys are made here (ECDSA P-256), live only in memory and never leave
the process; nothing in this package logs or dumps them.
"""
