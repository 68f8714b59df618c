"""``warm_start: auto`` end to end: two tiny domain experts (and a stronger one that another
buyer holds exclusively) in a real MLflow library; ``taas library match`` ranks them on the
commission's text; the commission flow (one small cycle) picks the domain's own expert, its
first cycle starts below the base's loss, the registered version names its parent, and the
parent's contributors are paid their share of the refined expert's licence revenue."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import yaml

from cli.main import main
from factory.corpus import licence_paragraphs
from factory.customer import customer_id_for
from factory.expert import save_expert
from factory.ledger import Ledger
from factory.library.provenance import RegistrationProvenance
from infra.settings import get_settings
from marketplace.catalog import library_commission_of
from marketplace.licensing import Licensing
from marketplace.lineage import library_parent_of
from tasks.cycle_commit import read_cycle_result
from tasks.warm_start import WARM_START_FILE, WarmStartChoice
from tests.conftest import TINY_COMMISSION
from tests.test_marketplace_library import BENCHMARK, PASSING_GATE
from tests.test_mixture_experts import RANK, experts_for, pack


def paragraph_expert(base, name: str, texts: list[str], steps: int):
    """A rank-4 LoRA trained ``steps`` AdamW steps (lr 1e-2, batches of 8 blocks of 64) on
    ``texts``, as tests.test_mixture_experts.train_expert does for its domains."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from factory.base_model import load_base
    from factory.expert import Expert, ExpertManifest, lora_config_dict
    from factory.hashing import tensors_sha256

    torch.manual_seed(0)
    model, tokenizer = load_base(base.path)
    config = lora_config_dict(RANK, 8.0)
    peft_model = get_peft_model(model, LoraConfig(**{**config, "inference_mode": False}))
    train = pack(texts, tokenizer, 64)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = train[torch.randint(0, train.shape[0], (8,), generator=generator)]
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    manifest = ExpertManifest(
        expert_id=name, domain="licence", version=1, base_model=base.name,
        base_model_sha256=base.sha256, adapter_sha256=tensors_sha256(adapter), rank=RANK,
        lora_alpha=8.0, target_modules=sorted(config["target_modules"]), num_layers=layers,
    )  # fmt: skip
    return Expert(manifest, adapter, config, torch.zeros(layers, hidden))


@pytest.mark.slow  # a real MLflow library and one commission through the flow (one cycle)
def test_warm_start_auto_refines_the_best_match(tiny_base, tmp_path, monkeypatch, capsys):
    from factory.library import ExpertLibrary
    from flows.commission import run_commission

    home = tmp_path / "home"
    monkeypatch.setenv("TAAS_HOME", str(home))
    monkeypatch.setenv("TAAS_BASE_MODEL_DIR", str(tiny_base.path))
    settings = get_settings(home=home, data_roots=[tmp_path], base_model_dir=tiny_base.path)
    library, ledger = ExpertLibrary(settings), Ledger(settings.db_url)
    digits, _ = experts_for(tiny_base)
    texts = licence_paragraphs()[400:]  # licence text the commission's 400 rows do not hold
    licence = paragraph_expert(tiny_base, "licence-expert", texts, steps=60)
    stronger = paragraph_expert(tiny_base, "secret-expert", texts, steps=120)
    for expert in (digits, licence, stronger):
        name = expert.manifest.expert_id
        prov = RegistrationProvenance(
            commission_id=f"com-{name}", dataset_sha256="d" * 64, config_hash="c" * 64,
            pol_scores={"line-0": 0.1}, cycles=1, contributors={"alice": "0.75", "bob": "0.25"},
            licence="usage+weight", visibility="public", customer_id=customer_id_for("Lab"),
        )  # fmt: skip
        library.register(save_expert(tmp_path / "lib" / name, expert), prov, BENCHMARK)
        assert library.promote(name, "1", PASSING_GATE).promote
        ledger.record_shares(name, f"com-{name}/cycle-1",
                             {"alice": Decimal(3), "bob": Decimal(1)}, {})  # fmt: skip
    licensing = Licensing(ledger, library_commission_of(settings), library_parent_of(settings))
    rival = licensing.create_buyer("Rival")
    licensing.grant(rival, "secret-expert", "1", "exclusive", Decimal(0), Decimal(0), Decimal(0))

    rows = licence_paragraphs()[:400]
    (tmp_path / "licences.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    # the CLI ranks the library on the buyer's text; the exclusive expert is not a candidate
    assert main(["library", "match", str(tmp_path / "licences.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in report["experts"]] == ["licence-expert", "digits-expert"]
    assert report["best"] == "licence-expert" and report["experts"][0]["delta"] < -0.02

    spec = {**TINY_COMMISSION, "warm_start": "auto",
            "budget": {**TINY_COMMISSION["budget"], "production_lines": 1}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    summary = run_commission(tmp_path / "spec.yaml", settings)
    root = home / "commissions" / summary["commission_id"]
    choice = WarmStartChoice.model_validate_json((root / WARM_START_FILE).read_text())
    assert choice.chosen == "licence-expert@1"
    assert [ref for ref, *_ in choice.ranking] == ["licence-expert@1", "digits-expert@1"]
    first = read_cycle_result(root / "cycles" / "cycle-1")
    # the lines started from the parent: the first cycle's loss before training is the
    # parent's, below the base's on the same held-out split
    assert first.heldout_loss_before < choice.base_loss + choice.ranking[0][2] / 2
    assert first.heldout_loss_before < summary["heldout_loss_base"]

    registered = summary["registered"]
    tags = library.show(registered["name"], registered["version"]).tags
    assert (tags["parent_expert"], tags["parent_version"], tags["parent_share"]) == (
        "licence-expert", "1", "0.2",
    )  # fmt: skip
    lineage = library.lineage(registered["name"])
    assert lineage[-1]["parent"] == "licence-expert@1"
    # licence revenue of the refined expert: 20% to the parent's contributors (3:1)
    buyer = licensing.create_buyer("Buyer")
    licensing.grant(buyer, registered["name"], registered["version"], "weight", Decimal(0),
                    Decimal("1000.00"), Decimal(0))  # fmt: skip
    alice, bob = licensing.statement("alice"), licensing.statement("bob")
    line = {"expert": registered["name"], "version": registered["version"]}
    assert alice["lines"] == [{**line, "amount": "150.00"}]
    assert bob["lines"] == [{**line, "amount": "50.00"}]
    own = licensing.statements()
    refined = sum(
        (lines.get((registered["name"], registered["version"]), Decimal(0))
         for who, lines in own.items() if who not in ("alice", "bob")),
        Decimal(0),
    )  # fmt: skip
    assert refined == Decimal("800.00")
