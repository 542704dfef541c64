"""The gateway over HTTP/JSON: its RPCs at their google.api.http routes, an OpenAPI description and a
search page (`python -m gateway.http`)."""
