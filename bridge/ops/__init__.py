"""Operations: the Prometheus metrics (names are contract), structured logs, and the small HTTP
server behind /metrics, /healthz, /readyz and the demo receiver.

Imports bridge.base and bridge.lmtp only; every room above may import it.
"""
