"""OpenAI-compatible HTTP server.

`build_app(client, server_config, served_model_name)` (app.py) makes the FastAPI app around an
AsyncEngineClient; `run_server(engine_config, server_config)` (launcher.py) serves it with uvicorn.
"""
