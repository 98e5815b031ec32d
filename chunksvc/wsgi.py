"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py chunksvc.wsgi:app``.

Each gunicorn worker imports this after forking; gunicorn.conf.py then opens (``post_worker_init``)
and closes (``worker_exit``) ``db``, the worker's own connection pool.
"""

from chunksvc.app import build_database, create_app
from chunksvc.config import Config

config = Config.from_env()
db = build_database(config)
app = create_app(config, db=db)
