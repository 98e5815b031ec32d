"""``chunksvc-client``: upload, status, list and abort from the command line.

Exit status: 0 on success; 1 when the service refused or failed (the contract ``code`` and
detail on stderr) or the file could not be read; 2 for bad usage or configuration (no such file,
an empty one, a URL that is not http(s)); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from chunksvc_client.client import Client
from chunksvc_client.errors import ApiError
from chunksvc_client.progress import BarProgress, LineProgress

PROG = "chunksvc-client"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Upload files to chunksvc, resumably.")
    parser.add_argument(
        "--url", default=os.environ.get("CHUNKSVC_URL"), help="the service's base URL (default: $CHUNKSVC_URL)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CHUNKSVC_API_KEY"),
        help="the API key (default: $CHUNKSVC_API_KEY; prefer the variable: arguments show in ps)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    upload = commands.add_parser("upload", help="upload a file (run it again to resume)")
    upload.add_argument("file")
    upload.add_argument("--parallel", type=int, default=4, help="parts sent at once (default 4)")
    upload.add_argument("--part-size", type=int, default=None, help="bytes per part (default: the server's)")
    upload.add_argument("--content-type", default=None)
    upload.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="a metadata entry (repeatable)"
    )
    upload.add_argument("--json", action="store_true", help="print the completed session object on stdout")
    upload.add_argument("--quiet", action="store_true", help="no progress on stderr")

    status = commands.add_parser("status", help="print a session as JSON")
    status.add_argument("id")

    listing = commands.add_parser("list", help="list your sessions, newest first")
    listing.add_argument("--status", default=None)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    abort = commands.add_parser("abort", help="abort a session and remove its parts")
    abort.add_argument("id")

    limits = commands.add_parser("limits", help="your quotas and what you use of them")
    limits.add_argument("--json", action="store_true", help="the server's JSON")

    args = parser.parse_args(argv)
    if not args.url or not args.api_key:
        parser.error("the service URL and API key are needed: --url/--api-key or CHUNKSVC_URL/CHUNKSVC_API_KEY")
    if args.command == "upload":
        if args.parallel < 1:
            parser.error("--parallel must be at least 1")
        if not os.path.isfile(args.file):
            parser.error(f"{args.file} is not a file")
        try:
            args.metadata = dict(entry.split("=", 1) for entry in args.metadata)
        except ValueError:
            parser.error("--metadata takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with Client(args.url, args.api_key) as client:
            return run(client, args)
    except ApiError as error:
        print(f"{PROG}: {error.code}: {error.detail}", file=sys.stderr)
        if error.request_id:
            print(f"{PROG}: request id {error.request_id}", file=sys.stderr)
        return 1
    except ValueError as error:  # an empty file, a URL that is not http(s): nothing a retry mends
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same upload again to resume", file=sys.stderr)
        return 130


def run(client: Client, args: argparse.Namespace) -> int:
    if args.command == "upload":
        label = os.path.basename(args.file)
        progress = None if args.quiet else BarProgress(label) if sys.stderr.isatty() else LineProgress(label)
        session = client.upload_file(
            args.file,
            part_size=args.part_size,
            parallel=args.parallel,
            content_type=args.content_type,
            metadata=args.metadata or None,
            progress=progress,
        )
        if args.json:
            print_json(session)
        else:
            stored = session["object"]
            print(
                f"{session['id']} COMPLETED {stored['size']} bytes sha256 {stored['sha256']} key {stored['key']}",
                file=sys.stderr,
            )
    elif args.command == "status":
        print_json(client.get_session(args.id))
    elif args.command == "list":
        for session in client.iter_sessions(status=args.status):
            if args.json:
                print(json.dumps(session), flush=True)
            else:
                print(
                    f"{session['id']}  {session['status']:<11}  {session['received_parts']:>5}/"
                    f"{session['total_parts']:<5}  {session['size']:>14}  {session['filename']}",
                    flush=True,
                )
    elif args.command == "abort":
        client.abort(args.id)
    elif args.command == "limits":
        limits = client.limits()
        if args.json:
            print_json(limits)
        else:
            for name in ("sessions", "bytes"):
                print(f"{name:<9} {limits[name]['used']:>16} used of {limits[name]['limit']}")
            rate = limits["rate"]
            shown = f"{rate['limit']}/s, bursts of {rate['burst']}" if rate["limit"] else "off"
            print(f"{'rate':<9} {shown}")
    return 0


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
