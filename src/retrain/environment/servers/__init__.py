"""MCP servers that ship with retrain (run as `python -m retrain.environment.servers.<name>`)."""
