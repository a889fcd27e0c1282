"""Media and side models: vision-language models (mlx-vlm) and their images, speech to text (mlx-audio),
sentence embeddings."""
