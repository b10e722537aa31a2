"""`tracedoffload serve`: an OpenAI-compatible HTTP server over the offloaded model, with
continuous batching (engine.py), OpenAI's shapes (protocol.py), and the routes (app.py)."""
