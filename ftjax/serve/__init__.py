"""OpenAI-compatible serving: request validation (api), batching, classification, HTTP server."""

from ftjax.serve.models import ServedModel, load_served
from ftjax.serve.server import App, make_server

__all__ = ["App", "ServedModel", "load_served", "make_server"]
