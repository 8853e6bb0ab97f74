"""The ground floor: what every room shares. The received message and its envelope (transaction),
a resolved route and the address helpers (route), listen addresses (listen), plain-TCP socket I/O
(sockio).

Imports the standard library and bridge.lmtp only; every other package may import it.
"""
