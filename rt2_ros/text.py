"""Text from outside (model answers, server error details, URLs) made safe for a ROS message or a log line.

A backend can answer with anything: invalid Unicode (a lone surrogate decoded from a JSON
``\\ud800`` escape makes rclpy's string serialisation and the logger raise), megabytes of text,
terminal control sequences, or an error detail that echoes a URL with a password or token in it.
:func:`clean_text` is applied where such text enters the core (rt2_ros.policy builds every
outcome's text, plan and detail through it), so nothing downstream has to care.
"""

from __future__ import annotations

import re

#: longest text kept in a message field or a log line (characters)
DEFAULT_LIMIT = 1000

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # keeps \t and \n
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:api[_-]?key|key|token|access_token|password|passwd|secret|sig|"
                           r"signature|auth)=)[^&;\s#]+")
_BEARER = re.compile(r"(?i)\b(bearer|api-key)\s+[A-Za-z0-9._~+/=-]{8,}")


def clean_text(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` as valid UTF-8 without control characters (tab and newline kept), credentials in URLs,
    query strings and auth headers masked, and at most ``limit`` characters (cut ends with "…")."""
    s = text if isinstance(text, str) else str(text)
    if len(s) > 4 * limit:  # bound the work on a huge answer before the regexes run
        s = s[:4 * limit]
    s = s.encode("utf-8", errors="replace").decode("utf-8")  # lone surrogates -> "?"
    s = _CONTROL.sub(" ", s)
    s = _URL_CREDENTIALS.sub(r"\1***@", s)
    s = _SECRET_QUERY.sub(r"\1***", s)
    s = _BEARER.sub(r"\1 ***", s)
    return s if len(s) <= limit else s[:limit - 1] + "…"


__all__ = ["DEFAULT_LIMIT", "clean_text"]
