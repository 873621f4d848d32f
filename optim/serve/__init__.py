"""Talking to other processes: remote/ (the remote text encoder's client, server, protocol and embedding cache), the
ComfyUI queue client, and the OpenAI image API's schema (openai_api); Ray Serve goes here next."""
