"""Serving the engine over HTTP: the request and reply schemas that the pack's API routes share, free of any web
framework, so the ComfyUI routes and a later standalone server parse, check and answer requests the same way."""
