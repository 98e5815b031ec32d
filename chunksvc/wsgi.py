"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py chunksvc.wsgi:app``.

Each gunicorn worker imports this after forking; gunicorn.conf.py then opens (``post_worker_init``)
and closes (``worker_exit``) ``db``, the worker's own connection pool, and starts and stops
``assembler``, the worker's background assembler, ``reaper``, its periodic reaper, and
``deliverer``, its webhook deliverer.
"""

from chunksvc.app import build, build_database
from chunksvc.config import Config

config = Config.from_env()
db = build_database(config)
app, assembler, reaper, deliverer = build(config, db=db)
