"""The remote text encoder's URL rules, without torch (the serve configuration checks them before Ray starts):
the official endpoint, how a URL is shown in messages (no credentials, no query), and what a usable one is."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ...errors import InputError
from ...options import REMOTE_TOKEN_ENV as TOKEN_ENV

PUBLIC_URL = "https://remote-text-encoder-flux-2.huggingface.co/predict"
SETTINGS_TOKEN_ID = "flux2accel.remote_token"


def safe_url(url: str) -> str:
    """`url` without credentials or query string: the form that may appear in messages and identities.

    Never raises, even for a URL that urlsplit cannot read (it is used on the error path of such URLs too).
    """
    url = str(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:  # a bad port or bracket: keep the text, minus credentials, query and fragment
        scheme, sep, rest = url.partition("://")
        rest = re.split(r"[?#]", rest if sep else url, maxsplit=1)[0]
        netloc, slash, path = rest.partition("/")
        netloc = netloc.rpartition("@")[2]
        return f"{scheme}{sep}{netloc}{slash}{path}"[:200]


def validate_url(url: str, field_name: str = "endpoint_url") -> str:
    url = (url or "").strip() if isinstance(url, str) else url
    if not isinstance(url, str):
        raise InputError(f"{field_name} must be a URL string such as {PUBLIC_URL}; got {type(url).__name__}.")
    if re.search(r"[\x00-\x20\x7f]", url):
        raise InputError(f"{field_name} {safe_url(url)!r} contains spaces or control characters; give a URL such as "
                         f"{PUBLIC_URL}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise InputError(f"{field_name} '{safe_url(url)}' is not a valid URL ({e}); give one such as "
                         f"{PUBLIC_URL} or http://host:8199/predict.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{field_name} must be an http:// or https:// URL such as {PUBLIC_URL}; "
                         f"got '{safe_url(url)}'.")
    if parts.username or parts.password:
        raise InputError(f"{field_name} must not contain credentials: they would be saved in the workflow. Set the "
                         f"token in the {TOKEN_ENV} environment variable or the ComfyUI setting '{SETTINGS_TOKEN_ID}'.")
    return url
