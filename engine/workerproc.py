"""Entry point of a worker process: gevent patches the standard library first of all.

Run as `python -m engine.workerproc ...` (the supervisor does so). Patching must
happen before anything imports socket, ssl or smtplib, which is why this module
imports the engine only afterwards.
"""
from gevent import monkey

monkey.patch_all()

import sys

from engine.worker import main

if __name__ == "__main__":
    sys.exit(main())
