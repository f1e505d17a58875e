"""Entry point of a worker process: gevent patches the standard library first of all.

Run as `python -m engine.workerproc ...` (the supervisor does so). Patching must
happen before anything imports socket, ssl or smtplib, which is why this module
imports the engine only afterwards.
"""
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402 (after patch_all, on purpose)

from engine.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
