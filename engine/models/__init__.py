"""Finding and loading models: the store and the Hub, the embedded defaults, the probe of a folder, the run
policy, the memory gate, weight loading and which models stay resident."""
