"""Control plane entrypoint: read ``Settings`` once, start or find the engines, serve.

    WEIGHTSYNC_MODEL=/models/policy WEIGHTSYNC_ENGINES=2 python -m services.serve

Binds 127.0.0.1:8765 by default; a non-loopback ``WEIGHTSYNC_HOST`` needs ``WEIGHTSYNC_TOKEN``
(the process refuses to start otherwise, with exit code 2, before touching Ray).
"""

from __future__ import annotations

import logging
import sys

from weightsync.config import Settings
from weightsync.errors import ConfigError
from weightsync.ray_compat import prepare


def main() -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    mode = prepare(settings.ray_address, settings.ray_auth_mode)  # before Ray's import
    from weightsync.api.server import serve

    try:
        serve(settings, mode)
    except ConfigError as e:
        logging.getLogger("services.serve").error("refusing to start: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
