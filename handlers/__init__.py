"""openmlx's HTTP layer: thin handlers bound to openapi.yaml's operations (each names its function in
`x-openmlx-handler`; operationIds are OpenAI's names, for generated clients), and the CLI.

Handlers parse a request into engine types, call the engine, and shape OpenAI responses. They
never import mlx.
"""
