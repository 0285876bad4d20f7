"""Print a recording: each chunk's time, fd and text (repr); meta and exit as they are."""

import base64
import json
import sys

with open(sys.argv[1], encoding="utf-8") as fh:
    for line in fh:
        record = json.loads(line)
        if record["kind"] == "chunk":
            text = base64.b64decode(record["b64"]).decode("utf-8", "replace")
            print(record["t"], record["fd"], repr(text))
        else:
            print(record)
