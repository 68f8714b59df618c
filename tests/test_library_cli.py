"""`taas library` commands against the embedded store named by TAAS_HOME."""

from __future__ import annotations

from cli.main import main
from evaluation.benchmark import BenchmarkResult
from factory.expert import load_expert
from factory.library import ExpertLibrary
from factory.library.provenance import RegistrationProvenance
from infra.settings import get_settings


def test_library_commands(taas_home, tiny_expert_folder, tmp_path, capsys):
    library = ExpertLibrary(get_settings())
    prov = RegistrationProvenance(
        commission_id="com-cli", dataset_sha256="d", config_hash="c", cycles=1
    )
    table = BenchmarkResult(table={"expert": {"taas_general_cloze": {"acc": 0.6}}})
    library.register(tiny_expert_folder, prov, table)

    assert main(["library", "list", "--domain", "legal"]) == 0
    out = capsys.readouterr().out
    assert "expert-legal" in out and "challenger" in out and "acc=0.6" in out
    assert main(["library", "show", "expert-legal", "--version", "1"]) == 0
    assert '"commission_id": "com-cli"' in capsys.readouterr().out
    assert main(["library", "compare", "expert-legal@1", "expert-legal@challenger"]) == 0
    assert "| taas_general_cloze/acc | 0.6 | 0.6 |" in capsys.readouterr().out
    assert main(["library", "lineage", "expert-legal"]) == 0
    assert "com-cli" in capsys.readouterr().out
    dest = tmp_path / "bundle"
    assert (
        main(["library", "export", "expert-legal", "--alias", "challenger", "--dest", str(dest)])
        == 0
    )
    assert load_expert(dest).manifest.expert_id == "expert-legal"
    # No champion was ever replaced: nothing to roll back to, a one-line error and exit 2.
    assert main(["library", "rollback", "expert-legal"]) == 2
    assert "no previous champion" in capsys.readouterr().err
    assert main(["library", "show", "expert-nope"]) == 2


def test_generate_resolves_library_names(taas_home, tiny_base, tiny_expert_folder, capsys):
    """`taas generate --experts NAME@VERSION` loads the version from the library."""
    library = ExpertLibrary(get_settings())
    prov = RegistrationProvenance(commission_id="com-gen", dataset_sha256="d", config_hash="c")
    library.register(tiny_expert_folder, prov)
    argv = ["generate", "--experts", "expert-legal@1", "--base", str(tiny_base.path)]
    assert main([*argv, "--prompt", "The licensee shall", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("The licensee shall") and len(lines) >= 2
    assert all(line.rsplit("\t", 1)[-1] in ("expert-legal", "base") for line in lines[1:])
    cached = taas_home / "library" / "expert-legal" / "1"
    assert (
        load_expert(cached).manifest.adapter_sha256
        == load_expert(tiny_expert_folder).manifest.adapter_sha256
    )
    assert main(["generate", "--experts", "expert-nope@1", "--prompt", "x"]) == 2
    assert "neither a library expert nor a folder" in capsys.readouterr().err
