"""Remote text encoding: a client for FLUX.2 remote text encoder endpoints, its embedding cache, and our server.

The server (`server.py`, aiohttp) is imported on demand so the client stays dependency-light.
"""

from .client import (RemoteAuthError, RemoteEncoderConfig, RemoteEncoderError, RemoteTextEncoder, RetryPolicy,
                     TokenNotAllowedError, listed_hosts, resolve_token, token_from_settings_file)
from .embedding_cache import EmbeddingCache
from .protocol import PUBLIC_URL, decode_tensor, encode_tensor

__all__ = ["PUBLIC_URL", "EmbeddingCache", "RemoteAuthError", "RemoteEncoderConfig", "RemoteEncoderError",
           "RemoteTextEncoder", "RetryPolicy", "TokenNotAllowedError", "decode_tensor", "encode_tensor",
           "listed_hosts", "resolve_token", "token_from_settings_file"]
