"""Benchmarks that print JSON lines; see BENCHMARKS.md for the figures and the commands."""

from starlette.requests import Request

# Model.predict's second argument when it is called outside the server: a request declaring no body.
NO_BODY = Request({"type": "http", "headers": []})
