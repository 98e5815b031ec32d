"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py chunksvc.wsgi:app``.

Each gunicorn worker imports this after forking, so each opens its own connection pool.
"""

from chunksvc.app import create_app
from chunksvc.config import Config

app = create_app(Config.from_env())
