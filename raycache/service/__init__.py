"""The embedding-plus-cache HTTP service: the FastAPI app (``api``: ``create_app`` from ``settings``,
``models``, ``backend`` and the ``routes`` package, with the chat request -> cache key mapping in
``chat_scope`` and the chat completion wire format in ``completions``) on Ray Serve deployments
(``app``), the OpenAI-compatible upstream client (``upstream``) and the ``serve deploy`` YAML
(``serve_config``). Submodules import Ray lazily where they can; import them directly."""
