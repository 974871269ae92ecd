"""The OpenAI-compatible model server: ``serve.py`` starts it; intake, request checks, the wire
format (api.py), generation (engine.py, stream.py), metrics and the teacher fallback."""
