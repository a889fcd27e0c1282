"""Finding and loading models: the store and the Hub (downloads and their guards), the embedded defaults,
GGUF files imported into the store, the probe of a folder, the run policy, the memory gate and weight loading."""
