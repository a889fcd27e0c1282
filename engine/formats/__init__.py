"""Model files MLX does not read itself, converted once into the store: GGUF (llama.cpp) and
CTranslate2 Whisper."""
