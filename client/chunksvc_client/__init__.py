"""The chunksvc client: ``Client(url, api_key).upload_file(path)``, and the ``chunksvc-client`` CLI."""

from chunksvc_client.client import Attempt, Client, FileRange
from chunksvc_client.errors import ApiError
from chunksvc_client.progress import BarProgress, LineProgress, NoProgress, Progress
from chunksvc_client.retry import RetryPolicy
from chunksvc_client.webhooks import SignatureError, verify_event

__all__ = [
    "ApiError",
    "Attempt",
    "BarProgress",
    "Client",
    "FileRange",
    "LineProgress",
    "NoProgress",
    "Progress",
    "RetryPolicy",
    "SignatureError",
    "verify_event",
]
__version__ = "0.1.0"
