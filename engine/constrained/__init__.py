"""Constrained output: JSON schemas and tool calls compiled to llguidance grammars, and the tool-call
formats of each model family (toolcalls/)."""
