#!/usr/bin/env bash
set -eu
URL=${CHUNKSVC_URL:-http://127.0.0.1:8000}
# The key: yours, or a new one for client "me" (make's last line is the key alone).
KEY=${CHUNKSVC_API_KEY:-$(make -s --no-print-directory -C "$(dirname "$0")/.." api-key NAME=me | tail -n 1)}
AUTH="Authorization: Bearer $KEY"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; cd "$WORK"

head -c 20000000 /dev/urandom > file.bin             # 20 MB: three 8 MiB parts, the last shorter
split -b 8388608 -d file.bin chunk.                  # chunk.00 chunk.01 chunk.02
SIZE=$(stat -c %s file.bin)
SHA=$(sha256sum file.bin | cut -d' ' -f1)

# 1. open a session (201, with Location and the session object)
SESSION=$(curl -fsS -H "$AUTH" -H 'Content-Type: application/json' \
  -d "{\"filename\": \"file.bin\", \"size\": $SIZE, \"part_size\": 8388608, \"sha256\": \"$SHA\"}" \
  "$URL/uploads/sessions" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')

# 2. upload the parts, in any order (201 each; the same bytes again would be 200)
curl -fsS -X PUT -H "$AUTH" --data-binary @chunk.02 "$URL/uploads/sessions/$SESSION/parts/3"
curl -fsS -X PUT -H "$AUTH" --data-binary @chunk.00 "$URL/uploads/sessions/$SESSION/parts/1"
curl -fsS -X PUT -H "$AUTH" --data-binary @chunk.01 "$URL/uploads/sessions/$SESSION/parts/2"

# (resuming? ask what arrived:)
curl -fsS -H "$AUTH" "$URL/uploads/sessions/$SESSION/parts"

# 3. complete: assembles, verifies size and SHA-256, answers 200 with "object"
curl -fsS -X POST -H "$AUTH" "$URL/uploads/sessions/$SESSION/complete" > completed.json
STORED=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["object"]["sha256"])' < completed.json)
test "$STORED" = "$SHA" && echo "stored and verified: $SHA"
