"""What may be shown of a database URL: everything but its password. The standard library only, so that
`cli.py` can use it before anything heavy is imported."""

from __future__ import annotations

import re

# A password given as a parameter (`?password=…`, `&sslpassword=…`) or in a keyword DSN (`password=…`).
_PASSWORD_PARAMETER = re.compile(r"(?i)(\b(?:ssl)?password=)[^&\s]*")


def redact_url(url: str) -> str:
    """The URL with every password in it replaced by `***`, for messages and logs; the user, hosts,
    database and other parameters stay, since they say which server was meant."""
    scheme, separator, rest = url.partition("://")
    if separator:
        # The user info ends at the host's last "@" (a password may hold an unencoded "@"); the query's
        # parameters, after the first "?", are handled below.
        authority, question, query = rest.partition("?")
        credentials, at, hosts = authority.rpartition("@")
        user, colon, _password = credentials.partition(":")
        if at and colon:
            authority = f"{user}:***@{hosts}"
        url = f"{scheme}{separator}{authority}{question}{query}"
    return _PASSWORD_PARAMETER.sub(r"\1***", url)
