"""Settings: the model (settings), where values come from (sources), what the operator sees of them
(report: one-line problems, redaction), and the configured routes resolved for delivery (routes).

The top of the house below the face: may import every room (to validate what each one takes);
nothing but app, cli and workers imports it.
"""

from bridge.config.report import REDACTED, ConfigError, redact_url, redacted_dump
from bridge.config.settings import MAX_RETRY_BUDGET, RouteConfig, Settings
from bridge.config.sources import load_settings, unknown_env_vars

__all__ = [
    "MAX_RETRY_BUDGET",
    "REDACTED",
    "ConfigError",
    "RouteConfig",
    "Settings",
    "load_settings",
    "redact_url",
    "redacted_dump",
    "unknown_env_vars",
]
