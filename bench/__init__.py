"""Speed of openmlx side by side with its peers on one machine, same model, same prompts.

Run as `python -m bench`; see bench/README.md. Not part of the test suite.
"""
