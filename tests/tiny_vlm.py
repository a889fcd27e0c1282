"""A tiny, randomly initialised Qwen2-VL folder that the real mlx-vlm pipeline loads offline.

No small vision-language model ships on PyPI, so tests build one (shared/MODELS.md): the default
model's real tokenizer plus Qwen2-VL's vision tokens, a chat template that renders image parts,
the image processor's configs (so mlx-vlm never asks the Hub), and random weights. Its text is
gibberish but deterministic for a seed; the processor, template, vision tower and streaming are
the real ones.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# ChatML with image parts rendered as Qwen2-VL's placeholder (the processor expands it to the
# image's patch count).
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen2_vl(folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write the model folder; returns it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs
    from tokenizers import AddedToken, Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")

    base_cfg = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
        "bos_token": base_cfg.get("bos_token", "<|im_start|>"), "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "model_max_length": 2048,
        "additional_special_tokens": VISION_TOKENS, "processor_class": "Qwen2VLProcessor"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "additional_special_tokens": VISION_TOKENS}))
    image_proc = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
                  "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                  "min_pixels": 56 * 56, "max_pixels": 112 * 112,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711],
                  "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                  "rescale_factor": 1 / 255}
    (folder / "preprocessor_config.json").write_text(json.dumps(image_proc))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**image_proc,
                                                                       "video_processor_type": "Qwen2VLVideoProcessor"}))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))

    config = {
        "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": eos, "bos_token_id": tok.token_to_id("<|im_start|>"),
        "vision_config": {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64,
                          "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "mlp_ratio": 2, "in_channels": 3, "in_chans": 3, "spatial_patch_size": 14},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))

    params = json.loads(json.dumps(config))  # from_dict adds text_config to it, as mlx-vlm's loader relies on
    model_config = qwen2_vl.ModelConfig.from_dict(params)
    model_config = update_module_configs(model_config, qwen2_vl, params, ["text", "vision"])
    mx.random.seed(seed)
    model = qwen2_vl.Model(model_config)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


if __name__ == "__main__":  # build one by hand: python tests/tiny_vlm.py OUT TOKENIZER_FOLDER
    import sys

    out = Path(sys.argv[1])
    shutil.rmtree(out, ignore_errors=True)
    print(write_tiny_qwen2_vl(out, Path(sys.argv[2])))
