"""The mark a Hub pull leaves in the store folder it made: the Hub (engine/models/hub.py) writes it,
its quota evicts only such folders, and a GGUF import (engine/models/gguf_import.py) may replace
only a folder an import or a pull made. It lives below both so neither imports the other."""

PULLED_MARK = ".openmlx-pull.json"  # put in the store by a Hub pull (what a store quota may evict)
