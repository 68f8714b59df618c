"""An expert as a real MLflow model: pyfunc loading by alias, the signature and input example, the
base referenced by path and sha256 (not copied), the model card as the version's description,
`mlflow models serve` answering an HTTP scoring request, and a registration retried after a
partial failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port
from test_library import BENCHMARK, gate, provenance

from factory.library import CHAMPION, ExpertLibrary
from factory.library.mlflow_model import INPUT_EXAMPLE
from infra import tracking
from infra.settings import Settings

PROMPT = "The licensee shall"


def reference_text(base_path: Path, expert_folder: Path, prompt: str, max_new: int) -> str:
    """The same greedy continuation computed directly with transformers + peft."""
    import torch
    from peft import PeftModel

    from factory.base_model import format_prompt, load_base

    base, tokenizer = load_base(base_path)
    model = PeftModel.from_pretrained(base, str(expert_folder)).eval()
    ids = tokenizer(format_prompt(tokenizer, prompt, chat=True), return_tensors="pt",
                    add_special_tokens=False)["input_ids"]  # fmt: skip
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=pad)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture
def champion(tiny_base, tiny_expert_folder, tmp_path, monkeypatch):
    """An expert registered and promoted in a fresh embedded store; the tracking URI is set in
    the environment as `mlflow` commands expect it."""
    settings = Settings(home=tmp_path / "home")
    library = ExpertLibrary(settings)
    version = library.register(
        tiny_expert_folder, provenance(base_model_path=tiny_base.path), BENCHMARK
    )
    assert library.promote(version.name, version.version, gate()).promote
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    return library


def test_champion_loads_as_pyfunc_and_answers_a_prompt(champion, tiny_base, tiny_expert_folder):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/expert-legal@champion")
    answer = model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"max_new_tokens": 12})
    expected = reference_text(tiny_base.path, tiny_expert_folder, PROMPT, 12)
    assert list(answer.columns) == ["text"] and answer["text"].tolist() == [expected]
    assert len(expected) > 0
    # The default parameter from the signature applies when none is given.
    assert model.predict(pd.DataFrame({"prompt": [PROMPT]}))["text"][0].startswith(expected)

    meta = model.metadata
    assert meta.get_input_schema().input_names() == ["prompt"]
    assert meta.get_output_schema().input_names() == ["text"]
    assert meta.get_params_schema().to_dict()[0]["default"] == 32
    assert meta.metadata["base_model_sha256"] == tiny_base.sha256
    config = model.model_config
    assert config == {
        "base_model_path": str(tiny_base.path.resolve()),
        "base_model_sha256": tiny_base.sha256,
    }
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"max_new_tokens": 0})

    # The base is referenced, not copied: the model folder holds the adapter, not base weights.
    v = champion.show("expert-legal", CHAMPION)
    assert v.source.endswith("/model")
    local = Path(mlflow.artifacts.download_artifacts(v.source))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert f"artifacts/{tiny_expert_folder.name}/adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith("model.safetensors") and "adapter" not in f]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["data"] == [[INPUT_EXAMPLE]]

    # The version's description is its model card.
    down = champion.settings.home / "down"
    card = champion._t.download_run_artifacts(champion.tracking, v.run_id, "card", down)
    mv = champion.tracking.client.get_model_version("expert-legal", v.version)
    assert mv.description == (card / "README.md").read_text()
    assert mv.description.startswith("---\nbase_model:")


def test_a_different_base_is_refused_by_hash(champion, tmp_path, monkeypatch):
    import mlflow

    from factory.base_model import ensure_base_model

    other = ensure_base_model(tmp_path / "other", "tiny", log=lambda *_: None)
    (other.path / "config.json").write_text(
        (other.path / "config.json").read_text().replace("}", ', "note": "changed"}', 1)
    )
    with pytest.raises(ValueError, match="base_model_path: .* has sha256"):
        mlflow.pyfunc.load_model(
            "models:/expert-legal@champion", model_config={"base_model_path": str(other.path)}
        )
    with pytest.raises(ValueError, match="base_model_path: no base model folder"):
        mlflow.pyfunc.load_model(
            "models:/expert-legal@champion", model_config={"base_model_path": str(tmp_path / "x")}
        )


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_scoring_request(champion, tiny_base, tiny_expert_folder):
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
               "models:/expert-legal@champion", "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "-w", "1"]  # fmt: skip
    log = champion.settings.home / "serve.log"
    # The scoring server execs `uvicorn` by name: the venv's bin folder must be on PATH, as it is
    # in an activated venv.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = {
            "dataframe_split": {"columns": ["prompt"], "data": [[PROMPT], ["The licensor"]]},
            "params": {"max_new_tokens": 10},
        }
        request = urllib.request.Request(url + "/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
    expected = [reference_text(tiny_base.path, tiny_expert_folder, p, 10)
                for p in (PROMPT, "The licensor")]  # fmt: skip
    assert answer == {"predictions": [{"text": text} for text in expected]}


def test_registration_retried_after_a_failure_past_the_params_succeeds(
    tiny_base, tiny_expert_folder, tmp_path
):
    library = ExpertLibrary(Settings(home=tmp_path / "home"))
    run_id = tracking.start_run(library.tracking, "commission-com-1")  # the commission's run
    failing = types.SimpleNamespace(**vars(tracking))
    calls = []

    def create_version_fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("registry went away after the params were logged")
        return tracking.create_version(*args, **kwargs)

    failing.create_version = create_version_fails_once
    library._t = failing
    prov = provenance(base_model_path=tiny_base.path)
    with pytest.raises(ConnectionError):
        library.register(tiny_expert_folder, prov, BENCHMARK, run_id=run_id)
    run = library.tracking.client.get_run(run_id)
    first_trained_at = run.data.tags["prov.trained_at"]
    assert run.data.params["prov.adapter_sha256"] and "prov.trained_at" not in run.data.params
    assert library._t.search_versions(library.tracking, name="expert-legal") == []
    # A second later, so a per-attempt value really differs from the first attempt's.
    time.sleep(max(0.0, 1.05 - (time.time() % 1)))
    version = library.register(tiny_expert_folder, prov, BENCHMARK, run_id=run_id)
    assert (version.version, version.aliases, len(calls)) == ("1", ["challenger"], 2)
    run = library.tracking.client.get_run(run_id)
    assert run.data.tags["prov.trained_at"] == version.tags["trained_at"] != first_trained_at
    assert run.data.params["prov.idempotency_key"] == version.tags["idempotency_key"]
    # And once registered, the same result is the same version.
    again = library.register(tiny_expert_folder, prov, BENCHMARK, run_id=run_id)
    assert again.version == "1" and len(calls) == 2
