"""`acs-serve`: run the server; SIGTERM drains (refuse new work, finish in-flight, exit)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .config import parse_args


class DrainingServer(uvicorn.Server):
    """Marks the app as draining (readiness fails) as soon as a stop signal arrives; uvicorn
    then stops accepting connections and waits for the requests in flight."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.serving_state = state

    def handle_exit(self, sig, frame) -> None:
        self.serving_state.draining = True
        super().handle_exit(sig, frame)


def main(argv=None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.graceful_timeout_s))
    DrainingServer(config, app.state.server).run()


if __name__ == "__main__":
    main()
