"""Contract checks: responses against our openapi.yaml and OpenAI's official document."""
