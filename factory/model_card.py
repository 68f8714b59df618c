"""Model cards for library experts: README.md with Hugging Face metadata front matter.

The front matter follows the Hub's model card metadata (``base_model``, ``license``, ``tags``,
``library_name``, ``model-index`` with one result per benchmark task), so a bundle pushed to any
Hub-compatible registry renders with its scores. The body states provenance and how to load the
expert. :func:`integration_markdown` is the INTEGRATION.md of an exported bundle.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from factory.expert import ExpertManifest

LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})


def model_index(name: str, scores: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """``scores[task][metric]`` as a Hub ``model-index`` (one result per task)."""
    results = []
    for task in sorted(scores):
        metrics = [
            {"type": metric, "name": metric, "value": round(float(value), 6)}
            for metric, value in sorted(scores[task].items())
        ]
        results.append(
            {
                "task": {"type": "text-generation", "name": task},
                "dataset": {"type": task, "name": task},
                "metrics": metrics,
            }
        )
    return [{"name": name, "results": results}]


def model_card(
    manifest: ExpertManifest,
    provenance: dict[str, Any],
    scores: dict[str, dict[str, float]] | None,
    licence: str,
    base_scores: dict[str, dict[str, float]] | None = None,
) -> str:
    """The README.md text: YAML front matter, then a short human-readable card."""
    front = {
        "base_model": manifest.base_model,
        "library_name": "peft",
        "license": licence,
        "pipeline_tag": "text-generation",
        "tags": ["lora", "taas-factory", f"domain:{manifest.domain}", "mixture-of-experts"],
    }
    if scores:
        front["model-index"] = model_index(manifest.expert_id, scores)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {manifest.expert_id}",
        "",
        f"A LoRA expert for the **{manifest.domain}** domain on `{manifest.base_model}` "
        f"(rank {manifest.rank}, alpha {manifest.lora_alpha:g}, on "
        f"{', '.join(manifest.target_modules)}), with router rows for the routed mixture.",
        "",
        "## Provenance",
        "",
        f"- base model sha256: `{manifest.base_model_sha256}`",
        f"- adapter sha256: `{manifest.adapter_sha256}`",
    ]
    for key in sorted(provenance):
        value = provenance[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"- {key}: `{text}`")
    if scores:
        lines += ["", "## Benchmarks (lm-evaluation-harness)", ""]
        lines.append("| task | metric | expert | base |")
        lines.append("|---|---|---|---|")
        for task in sorted(scores):
            for metric, value in sorted(scores[task].items()):
                base = (base_scores or {}).get(task, {}).get(metric)
                arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
                base_text = "-" if base is None else f"{base:.4g}"
                lines.append(f"| {task} | {metric} {arrow} | {value:.4g} | {base_text} |")
    lines += ["", "## Use", "", "See INTEGRATION.md in an exported bundle.", ""]
    return "\n".join(lines)


def integration_markdown(manifest: ExpertManifest, base_model_hint: str) -> str:
    """INTEGRATION.md: loading the bundle with peft, and as one expert of the routed mixture."""
    return f"""# Integrating {manifest.expert_id}

Files: `adapter_config.json` + `adapter_model.safetensors` (PEFT LoRA), `router.safetensors`
(tensor `router`, shape [{manifest.num_layers}, hidden]), `expert.json` (manifest), `README.md`.
Base model: `{manifest.base_model}` (sha256 `{manifest.base_model_sha256}`).

## With peft

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_model_hint}", use_safetensors=True)
tokenizer = AutoTokenizer.from_pretrained("{base_model_hint}")
model = PeftModel.from_pretrained(base, "path/to/this/bundle")
ids = tokenizer("An example prompt", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))
```

## As an expert of the routed mixture

```python
import torch
from factory.base_model import load_base
from factory.mixture import load_mixture

base, tokenizer = load_base("{base_model_hint}")
# Loads with factory.expert.load_expert, which checks the adapter sha256 against expert.json;
# the expert's router rows (and the bundle's null route) route tokens, top-2 over the experts.
model = load_mixture(base, ["path/to/this/bundle"], top_k=2)
ids = tokenizer("An example prompt", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
```
"""
