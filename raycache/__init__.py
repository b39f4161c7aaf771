"""raycache: a semantic prompt cache for LLMs that learns when two prompts can share one response, on Ray.

The package itself imports nothing (Ray, torch and transformers load only where they are used): import
the module you need. docs/DESIGN.md maps every module to its one job.
"""
