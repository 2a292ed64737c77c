"""`acs-serve`: run the server; SIGTERM drains (refuse new work, finish in-flight, exit)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from models.engines.allocator import keep_freed_memory

from .app import create_app
from .config import parse_args


class DrainingServer(uvicorn.Server):
    """Marks the app as draining (readiness fails) as soon as a stop signal arrives, keeps
    accepting for `drain_delay` seconds (connections already queued in the listen backlog
    would otherwise be reset), then lets uvicorn stop accepting and wait for the requests in
    flight. A second signal stops at once. A drained SIGTERM is a clean stop: exit status 0
    (uvicorn would re-raise the signal after shutdown)."""

    def __init__(self, config: uvicorn.Config, state, drain_delay: float) -> None:
        super().__init__(config)
        self.serving_state, self.drain_delay = state, drain_delay

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    def handle_exit(self, sig, frame) -> None:
        first = not self.serving_state.draining
        self.serving_state.draining = True
        if first and self.drain_delay > 0:
            timer = threading.Timer(self.drain_delay, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
        else:
            super().handle_exit(sig, frame)


def main(argv=None) -> None:
    settings = parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level,
                            timeout_keep_alive=int(settings.keep_alive_s),
                            timeout_graceful_shutdown=int(settings.graceful_timeout_s))
    DrainingServer(config, app.state.server, settings.drain_delay_s).run()


if __name__ == "__main__":
    main()
