"""Remote text encoding: a client for FLUX.2 remote text encoder endpoints (client.py), its embedding cache
(embedding_cache.py), the wire format (protocol.py), the URL rules (urls.py, torch-free) and our server (server.py,
aiohttp). Import the module you need: this package imports none of them, so the URL rules stay light."""
