"""The gRPC service: `create_server` / `serve` in app.py, the servicer in service.py,
the single writer and event log in state.py."""
