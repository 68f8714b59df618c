"""Weight bundles hold only deliverables, and an export never deletes what its destination held.

Attacks that worked before: the expert folder carried replay.jsonl (64 rows of the customer's
training text) and both ``taas library export`` and the marketplace's weight download shipped
it; ``taas library export NAME --dest DIR`` committed over DIR, deleting the user's files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from factory.attestation import ATTESTATION_FILES
from factory.bundle import BUNDLE_FILES, TornExpert, bundle_members, write_bundle
from factory.expert import load_expert, save_expert
from infra.atomic import MARKER, verify_committed

CUSTOMER_ROW = "ACME-CONFIDENTIAL clause 7.2: the supplier's rebate is 31 percent"
ALLOWED = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "router.safetensors",
    "expert.json",
    "null_route.safetensors",
    "README.md",
    "INTEGRATION.md",
    "library.json",
    MARKER,
}


def legacy_folder(source: Path, folder: Path) -> Path:
    """An expert folder as experts composed before were saved: with replay.jsonl inside."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    expert = load_expert(source)
    layers, hidden = expert.router.shape
    null_route = expert.null_route or {
        "null_rows": torch.zeros(layers, hidden),
        "null_bias": torch.zeros(layers),
    }
    extras = {
        "replay.jsonl": (json.dumps({"text": CUSTOMER_ROW}) + "\n").encode(),
        "null_route.safetensors": safetensors_bytes(null_route),
    }
    return save_expert(folder, expert, overwrite=True, extra_files=extras)


def _card(tmp_path: Path) -> Path:
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text("# card\n")
    return card


def test_bundle_holds_only_deliverables(tiny_expert_folder, tmp_path):
    folder = legacy_folder(tiny_expert_folder, tmp_path / "expert")
    (folder / "stray.txt").write_text("added after the commit")
    os.symlink(folder / "replay.jsonl", folder / "link.jsonl")
    assert bundle_members(folder) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "expert.json",
         "null_route.safetensors", "router.safetensors"]
    )  # fmt: skip
    bundle = write_bundle(tmp_path / "bundle", folder, _card(tmp_path), "# use\n", {"name": "e"})
    names = {p.name for p in bundle.iterdir()}
    assert names == ALLOWED and names <= BUNDLE_FILES
    assert not any(CUSTOMER_ROW in p.read_bytes().decode("latin-1") for p in bundle.iterdir())
    assert verify_committed(bundle) and load_expert(bundle).manifest.expert_id == "expert-legal"


def test_a_torn_expert_folder_is_not_bundled(tiny_expert_folder, tmp_path):
    folder = legacy_folder(tiny_expert_folder, tmp_path / "expert")
    (folder / "router.safetensors").unlink()
    os.symlink(tiny_expert_folder / "router.safetensors", folder / "router.safetensors")
    with pytest.raises(TornExpert, match="router.safetensors is not the committed file"):
        write_bundle(tmp_path / "bundle", folder, _card(tmp_path), "", {})
    assert not (tmp_path / "bundle").exists()


def test_export_never_deletes_what_the_destination_held(tiny_expert_folder, tmp_path):
    folder = legacy_folder(tiny_expert_folder, tmp_path / "expert")
    dest = tmp_path / "Documents"
    dest.mkdir()
    (dest / "thesis.tex").write_text("four years of work")
    with pytest.raises(ValueError, match=r"dest: .*Documents exists and is not an empty folder"):
        write_bundle(dest, folder, _card(tmp_path), "", {})
    assert [p.name for p in dest.iterdir()] == ["thesis.tex"]
    assert (dest / "thesis.tex").read_text() == "four years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_bundle(a_file, folder, _card(tmp_path), "", {})
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert {p.name for p in write_bundle(empty, folder, _card(tmp_path), "", {}).iterdir()} == (
        ALLOWED
    )


def test_library_export_command(taas_home, tiny_expert_folder, tmp_path, capsys):
    from cli.main import main
    from factory.library import ExpertLibrary
    from infra.settings import get_settings

    folder = legacy_folder(tiny_expert_folder, tmp_path / "expert-legal")
    from factory.library.provenance import RegistrationProvenance

    prov = RegistrationProvenance(commission_id="com-b", dataset_sha256="d", config_hash="c")
    ExpertLibrary(get_settings()).register(folder, prov, None)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("mine")
    assert main(["library", "export", "expert-legal", "--dest", str(dest)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow logs its start above)
    assert last.startswith("taas: error: dest: ") and "not an empty folder" in last
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    assert main(["library", "export", "expert-legal", "--dest", str(dest / "bundle")]) == 0
    # A registered version's bundle also carries its attestation (taas verify checks it).
    assert {p.name for p in (dest / "bundle").iterdir()} == ALLOWED | set(ATTESTATION_FILES)
    assert (dest / "mine.txt").read_text() == "mine"


def test_marketplace_download_holds_only_deliverables(tiny_base, tmp_path):
    from factory.ledger import Ledger
    from marketplace.licensing import Licensing
    from marketplace.market import Market, MarketplaceConfig
    from marketplace.sample import sample_catalog

    catalog = sample_catalog(tiny_base, tmp_path / "experts", ["law"])
    config = MarketplaceConfig(secret="s" * 24, base_model_path=tiny_base.path, min_domains=1)
    market = Market(config, catalog, Licensing(Ledger(f"sqlite:///{tmp_path / 'l.db'}")))
    entry = catalog.get("law-expert")
    folder = Path(catalog.expert_folder("law-expert", entry.champion))
    legacy_folder(folder, folder)
    data, digest = market.bundle(entry, entry.champion)
    time.sleep(1.1)  # gzip stamps the current second unless told otherwise
    assert market.bundle(entry, entry.champion)[1] == digest  # one version, one sha256
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {Path(m.name).name for m in tar.getmembers()}
        marker = json.loads(tar.extractfile(f"law-expert-{entry.champion}/{MARKER}").read())
    assert "replay.jsonl" not in names and names <= ALLOWED
    assert {"adapter_model.safetensors", "router.safetensors", "expert.json"} <= names
    assert set(marker["files"]) == names - {MARKER}  # the bundle verifies as committed
    assert CUSTOMER_ROW.encode() not in data
