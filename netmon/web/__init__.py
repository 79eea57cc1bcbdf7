"""netmon's HTTP side: make_app(monitor) returns a Bottle app that only reads from the
monitor; server.Server runs it on cheroot, behind guard.Guard (token, Host, CORS).

app.py builds the app from RESOURCES, one module per resource (index, connections,
events, top, stats, metrics, openapi, page), each with a routes(app) that registers its routes.
To add a resource, write one such module and list it in app.RESOURCES. Shared pieces:
base.App (the monitor, JSON errors), params (parameters, filters), limits (error bodies).
"""
from .app import make_app

__all__ = ["make_app"]
