"""An OpenAI-compatible HTTP server for thinktalk: `create_app(omni, ...)` and `run_server(...)` in `app`."""
