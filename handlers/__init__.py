"""openmlx's HTTP layer: thin handlers bound to openapi.yaml's operationIds, and the CLI.

Handlers parse a request into engine types, call the engine, and shape OpenAI responses. They
never import mlx.
"""
