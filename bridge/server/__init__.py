"""The LMTP server on trio: listeners (TCP, unix), one task per session feeding the sans-IO core,
STARTTLS, timeouts and the drain; and how many CPUs the process may use (for workers = auto).

Imports bridge.delivery and everything below it; never config, app or cli.
"""
