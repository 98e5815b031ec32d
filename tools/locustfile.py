"""The load test's user for locust's own command line (web UI, distributed workers)::

    CHUNKSVC_API_KEY=... locust -f tools/locustfile.py --host https://uploads.example.com

Settings come from ``CHUNKSVC_LOADTEST_FILE_SIZE``, ``_PART_SIZE``, ``_PARALLEL``, ``_RETRIES``,
``_CONFLICT_RATE`` and ``_MAX_FILES`` (see ``loadtest.Settings``); ``make loadtest`` needs none of this.
"""

import os

from tools.loadtest import Settings, make_user

UploadUser = make_user(Settings.from_env(), os.environ["CHUNKSVC_API_KEY"])
