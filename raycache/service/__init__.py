"""The embedding-plus-cache HTTP service: FastAPI routes (``api``) on Ray Serve deployments
(``app``), the OpenAI-compatible upstream client (``upstream``) and the ``serve deploy`` YAML
(``serve_config``). Submodules import Ray lazily where they can; import them directly."""
