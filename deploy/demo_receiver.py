"""An example webhook receiver for docker-compose and the container smoke test: the
`lmtp-bridge demo` receiver on its own, listening on any address, printing each delivery.

    python demo_receiver.py [--listen HOST:PORT] [--secret-file FILE]

Run it with the image's python (the bridge package is installed there). With a secret file
(`whsec_...`), each delivery shows whether its Standard Webhooks signature verified.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from bridge.base.listen import parse_listen
from bridge.demo import demo_handler
from bridge.ops.httpserver import Handler, serve_http
from bridge.ops.logs import configure_logging


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:8025", metavar="HOST:PORT")
    parser.add_argument("--secret-file", metavar="FILE", help="whsec_... secret(s), one a line")
    args = parser.parse_args()
    where = parse_listen(args.listen)
    secrets: list[str] = []
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secrets = [s.strip() for s in f.read().replace(",", "\n").split() if s.strip()]
    configure_logging("text", "INFO")
    print(f"demo receiver: POST deliveries to http://{where}/hook", flush=True)
    trio.run(serve, demo_handler(sys.stdout, secrets), where.host or "", where.port or 0)
    return 0


async def serve(handler: Handler, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then return (exit 0, as a container should)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, handler, host, port)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    sys.exit(main())
