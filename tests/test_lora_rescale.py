"""rescale_to_config keeps the effective LoRA delta when only the scaling changes."""

import json

import pytest
import torch

from merging.lora_algebra import effective_deltas, rescale_to_config

KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"


def test_rescale_keeps_the_effective_delta_exactly():
    generator = torch.Generator().manual_seed(0)
    adapter = {
        KEY.format("A"): torch.randn(2, 3, generator=generator, dtype=torch.float64),
        KEY.format("B"): torch.randn(4, 2, generator=generator, dtype=torch.float64),
    }
    source = {"r": 2, "lora_alpha": 3.0, "target_modules": ["up_proj"]}
    target = {"r": 2, "lora_alpha": 8.0, "target_modules": ["up_proj"]}
    out = rescale_to_config(adapter, source, target)
    before = effective_deltas(adapter, source)
    after = effective_deltas(out, target)
    for prefix, delta in before.items():
        torch.testing.assert_close(after[prefix], delta, rtol=0, atol=1e-12)
    # golden: B is scaled by (3/2) / (8/2) = 0.375, A is untouched
    torch.testing.assert_close(out[KEY.format("B")], adapter[KEY.format("B")] * 0.375)
    assert torch.equal(out[KEY.format("A")], adapter[KEY.format("A")])


def test_rescale_refuses_a_rank_change():
    adapter = {KEY.format("A"): torch.zeros(2, 3), KEY.format("B"): torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="ranks differ"):
        rescale_to_config(adapter, {"r": 2, "lora_alpha": 1.0}, {"r": 4, "lora_alpha": 1.0})


# ---- lora_scaling: one definition, PEFT's per-module rank_pattern / alpha_pattern --------------

PATTERNED = {
    "r": 4,
    "lora_alpha": 8.0,
    "target_modules": ["down_proj", "gate_proj", "up_proj"],
    "rank_pattern": {"down_proj": 2, "layers.1.mlp.up_proj": 8},
    "alpha_pattern": {"gate_proj": 4.0},
}


def _key(layer: int, projection: str, part: str = "B") -> str:
    return f"base_model.model.model.layers.{layer}.mlp.{projection}.lora_{part}.weight"


def test_lora_scaling_golden_values():
    from factory.lora import lora_scaling, module_name, module_rank

    assert module_name(_key(0, "up_proj")) == "model.layers.0.mlp.up_proj"
    assert lora_scaling(PATTERNED) == 2.0  # no module: the defaults, 8 / 4
    assert lora_scaling(PATTERNED, module=_key(0, "up_proj")) == 2.0
    assert lora_scaling(PATTERNED, module=_key(1, "up_proj")) == 1.0  # r 8 from the pattern
    assert module_rank(PATTERNED, _key(1, "up_proj")) == 8
    assert lora_scaling(PATTERNED, module=_key(0, "down_proj")) == 4.0  # r 2: 8 / 2
    assert lora_scaling(PATTERNED, module=_key(1, "gate_proj", "A")) == 1.0  # alpha 4: 4 / 4
    assert lora_scaling(PATTERNED, rank=16, module=_key(0, "down_proj")) == 0.5  # rank given
    assert lora_scaling({"r": 4, "lora_alpha": 8.0, "use_rslora": True}) == 4.0  # 8 / sqrt(4)
    # A pattern matches at a dot boundary only, as PEFT's get_pattern_key does.
    assert lora_scaling({**PATTERNED, "rank_pattern": {"proj": 1}}, module=_key(0, "up_proj")) == 2
    with pytest.raises(ValueError, match="r must be >= 1"):
        lora_scaling({"r": 0, "lora_alpha": 1.0})


def test_lora_scaling_matches_peft_on_every_module(tiny_base):
    from peft import LoraConfig, get_peft_model

    from factory.base_model import load_base
    from factory.lora import lora_scaling

    config = LoraConfig(**PATTERNED, lora_dropout=0.0)
    model = get_peft_model(load_base(tiny_base.path)[0], config)
    seen = 0
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            ours = lora_scaling(PATTERNED, module=f"{name}.lora_A.weight")
            assert ours == module.scaling["default"], name
            assert module.lora_A["default"].weight.shape[0] == int(module.r["default"])
            seen += 1
    assert seen == 6  # two layers x three projections


def test_the_mixture_applies_patterned_scaling_like_peft(tiny_base, tmp_path):
    """A patterned expert forced as the only route reproduces PEFT's own forward."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    from factory.base_model import load_base
    from factory.expert import Expert, ExpertManifest, save_expert
    from factory.hashing import tensors_sha256
    from factory.mixture import MixtureModel

    torch.manual_seed(0)
    config = LoraConfig(**PATTERNED, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(load_base(tiny_base.path)[0], config).eval()
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.save_pretrained(tmp_path / "peft")
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base, tokenizer = load_base(tiny_base.path)
    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    manifest = ExpertManifest(
        expert_id="patterned", domain="patterned", version=1, base_model=tiny_base.name,
        base_model_sha256=tiny_base.sha256, adapter_sha256=tensors_sha256(adapter), rank=4,
        lora_alpha=8.0, target_modules=sorted(PATTERNED["target_modules"]), num_layers=layers,
    )  # fmt: skip
    expert = Expert(manifest, adapter, adapter_config, torch.zeros(layers, hidden))
    folder = save_expert(tmp_path / "expert", expert)
    ids = tokenizer("The licensee shall pay 17 + 25 = 42 ;", return_tensors="pt")["input_ids"]
    mixture = MixtureModel.from_experts(base, [expert])
    reloaded = PeftModel.from_pretrained(load_base(tiny_base.path)[0], str(folder)).eval()
    with torch.no_grad(), mixture.forced_route("patterned"):
        ours = mixture(ids).logits
        theirs = reloaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 1e-2  # the adapter does change the output


def test_merge_algebra_honours_patterns_where_the_rank_is_kept():
    from merging.lora_algebra import config_for_rank, recompress

    generator = torch.Generator().manual_seed(1)
    adapter = {
        _key(0, "down_proj", "A"): torch.randn(2, 3, generator=generator, dtype=torch.float64),
        _key(0, "down_proj", "B"): torch.randn(4, 2, generator=generator, dtype=torch.float64),
        _key(0, "gate_proj", "A"): torch.randn(4, 3, generator=generator, dtype=torch.float64),
        _key(0, "gate_proj", "B"): torch.randn(4, 4, generator=generator, dtype=torch.float64),
    }
    deltas = effective_deltas(adapter, PATTERNED)
    down, gate = (k.rsplit(".lora_", 1)[0] for k in (_key(0, "down_proj"), _key(0, "gate_proj")))
    a, b = adapter[_key(0, "down_proj", "A")], adapter[_key(0, "down_proj", "B")]
    torch.testing.assert_close(deltas[down], 4.0 * b @ a, rtol=0, atol=1e-12)  # 8 / 2
    a, b = adapter[_key(0, "gate_proj", "A")], adapter[_key(0, "gate_proj", "B")]
    torch.testing.assert_close(deltas[gate], 1.0 * b @ a, rtol=0, atol=1e-12)  # 4 / 4
    target = {**PATTERNED, "lora_alpha": 16.0, "alpha_pattern": {"gate_proj": 2.0}}
    out = rescale_to_config(adapter, PATTERNED, target)
    for prefix, delta in effective_deltas(out, target).items():
        torch.testing.assert_close(delta, deltas[prefix], rtol=0, atol=1e-12)
    # golden: down B scaled by (8/2) / (16/2) = 0.5, gate B by (4/4) / (2/4) = 2
    torch.testing.assert_close(out[_key(0, "down_proj")], adapter[_key(0, "down_proj")] * 0.5)
    torch.testing.assert_close(out[_key(0, "gate_proj")], adapter[_key(0, "gate_proj")] * 2.0)
    with pytest.raises(ValueError, match="rank_pattern/alpha_pattern are not supported when"):
        recompress(adapter, PATTERNED, 2)
    with pytest.raises(ValueError, match="rank_pattern/alpha_pattern are not supported when"):
        config_for_rank(PATTERNED, 8)
