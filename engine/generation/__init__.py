"""The text generation path: the text runner and its loop, batched and speculative decoding, sampling,
stop strings, prompt scoring, the prompt cache and the token budget."""
