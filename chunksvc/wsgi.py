"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py chunksvc.wsgi:app``.

Each gunicorn worker imports this after forking; gunicorn.conf.py then opens (``post_worker_init``)
and closes (``worker_exit``) ``db``, the worker's own connection pool, and starts and stops
``assembler``, the worker's background assembler, ``reaper``, its periodic reaper, and
``deliverer``, its webhook deliverer. A worker refuses to boot on a schema older than this release
needs (gunicorn then stops: run ``python -m chunksvc migrate``).
"""

from chunksvc.app import build, build_database, require_current_schema
from chunksvc.config import Config

config = Config.from_env()
db = build_database(config)
require_current_schema(config)
app, assembler, reaper, deliverer = build(config, db=db)
