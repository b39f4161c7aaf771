"""The HTTP API's routes, one module per group: ``cache`` (lookup, store, stats, clear, healthz),
``chat`` (the OpenAI-compatible proxy), and ``common`` (what every route shares: the API-key and
body-size guard, request checks, namespace authorisation, the JSON error shape).
:func:`raycache.service.api.create_app` puts them together."""
