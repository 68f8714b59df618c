"""Tiny base models in the three forms a spec can name: a single-file Llama folder, a sharded
Qwen2 folder with its index, and a GGUF file written with the ``gguf`` package's writer.

Each uses the tiny preset's BPE tokenizer, so data prepared for one tokenizes the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base.path)


def _config_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def llama_folder(tiny_base, folder: Path, seed: int = 1) -> Path:
    """A random tiny Llama (untied lm_head) saved as one model.safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(tiny_base)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_config_kwargs(tokenizer), tie_word_embeddings=False))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def qwen2_sharded_folder(tiny_base, folder: Path, seed: int = 2) -> Path:
    """A random tiny Qwen2 saved in several shards plus model.safetensors.index.json."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(tiny_base)
    torch.manual_seed(seed)
    config = Qwen2Config(**_config_kwargs(tokenizer), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutes q/k rows for its rotary layout; transformers'
    # GGUF loader undoes it.
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2)


def write_gguf(source: Path, path: Path, bad_tensor_type: bool = False) -> Path:
    """A GGUF file (llama architecture, F32 tensors, gpt2-style BPE tokenizer) holding the Llama
    folder ``source``; ``bad_tensor_type`` stores one tensor as F64, which cannot be read."""
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    tensors = {k: v.numpy() for k, v in load_file(source / "model.safetensors").items()}
    tok = json.loads((source / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok.get("added_tokens", [])}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-gguf")
    writer.add_license("apache-2.0")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf, gg in names.items():
            array = tensors[f"model.layers.{layer}.{hf}.weight"]
            if gg == "attn_q":
                array = _permute(array, config.num_attention_heads).reshape(array.shape)
            if gg == "attn_k":
                array = _permute(array, config.num_key_value_heads).reshape(array.shape)
            if bad_tensor_type and layer == 0 and gg == "ffn_up":
                array = array.astype(np.float64)
            writer.add_tensor(f"blk.{layer}.{gg}.weight", np.ascontiguousarray(array))
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors:
        writer.add_tensor("output.weight", tensors["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
