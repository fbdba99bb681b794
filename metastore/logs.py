"""Log output of a member: text for people, JSON lines for log pipelines.

Every record names the member it comes from, so the logs of several members
collected in one place (or running in one process) stay readable.
"""
from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else was passed with `extra=` and
# goes into the JSON object as a field of its own.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "member"}


class _MemberFilter(logging.Filter):
    def __init__(self, member: str) -> None:
        super().__init__()
        self.member = member

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "member"):
            record.member = self.member
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, member, logger, msg."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "member": getattr(record, "member", ""),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str, fmt: str, member: str) -> None:
    """Configure the root logger for `metastore serve`: `fmt` is text or json."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_MemberFilter(member))
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(member)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
