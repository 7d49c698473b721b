"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS, wire-compatible with Istio's.

``core`` is the sans-IO protocol (on ``h2``); ``aio`` runs it on asyncio
transports and exposes each tunnel as a relay leg.
"""
