"""`lmforge serve`: an OpenAI-compatible HTTP server (completions, chat) with classify / NER endpoints,
micro-batching, limits and an optional API key. See `lmforge.serve.app` for the routes."""

from lmforge.serve.app import create_app
from lmforge.serve.models import ServedModel, load_served_model, load_served_models

__all__ = ["create_app", "ServedModel", "load_served_model", "load_served_models", "run_server"]


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    # the ASGI server loads only when serving
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
