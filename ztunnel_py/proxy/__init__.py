"""The agent's L4 data path.

``outbound`` (:15001, captured connections; ``plan()`` decides), ``inbound``
(:15008, HBONE server), ``inbound_plaintext`` (:15006), ``relay`` (the copy
loop), ``pool`` (pooled HBONE client connections), ``sockets`` (the seams the
eBPF capture plugs into), ``server.Proxy`` (owns the listeners; start, drain,
stop) and ``testing`` (a loopback mesh and fakes for tests and benchmarks).
"""
