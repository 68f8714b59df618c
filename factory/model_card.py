"""Model cards for library experts: README.md built with huggingface_hub's ModelCard.

The metadata is the Hub's (:class:`huggingface_hub.ModelCardData`): ``base_model`` the base's
real name, ``library_name: peft``, ``license`` a Hub licence id (or ``other`` with
``license_name`` and ``license_link``), and one :class:`huggingface_hub.EvalResult` per benchmark
task and metric (``model-index``), so a bundle pushed to any Hub-compatible registry renders
with its scores. The body states provenance and how to load the expert.
:func:`integration_markdown` is the INTEGRATION.md of an exported bundle.
"""

from __future__ import annotations

import json
import re
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from factory.expert import ExpertManifest

LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})

#: Hub licence ids the factory's bases and commissions use (https://hf.co/docs/hub/repositories-licenses)
HUB_LICENCES = frozenset(
    "apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m "
    "bigcode-openrail-m llama2 llama3 llama3.1 llama3.2 llama3.3 gemma cc-by-4.0 cc-by-sa-4.0 "
    "cc-by-nc-4.0 cc-by-nc-sa-4.0 cc0-1.0 bsd-3-clause bsd-2-clause gpl-3.0 lgpl-3.0 agpl-3.0 "
    "mpl-2.0 unlicense artistic-2.0 afl-3.0 ecl-2.0 epl-2.0 wtfpl".split()
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


def hub_licence(licence: str, origin: str = "") -> dict[str, str]:
    """``{"license": id}`` for a Hub licence id (case-insensitive: Apache-2.0 -> apache-2.0),
    else ``{"license": "other", "license_name": slug, "license_link": link}``; the link is the
    origin when it is a URL, the base's Hub page when the origin names one, else LICENSE."""
    slug = re.sub(r"[^a-z0-9.+-]+", "-", licence.strip().lower()).strip("-") or "unknown"
    if slug in HUB_LICENCES:
        return {"license": slug}
    hub_id = base_hub_id("", origin)
    link = origin if origin.startswith(("https://", "http://")) else ""
    link = link or (f"https://huggingface.co/{hub_id}" if hub_id else "LICENSE")
    return {"license": "other", "license_name": slug, "license_link": link}


def base_hub_id(name: str, origin: str) -> str:
    """The base's real (Hub) name: the origin's first part when it is ``org/name``
    (``HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF ...``), else ``name``."""
    first = origin.split(",")[0].strip()
    return first if _HUB_ID.match(first) else name


def eval_results(scores: dict[str, dict[str, float]]) -> list[EvalResult]:
    """``scores[task][metric]`` as Hub eval results (one per task and metric)."""
    return [
        EvalResult(
            task_type="text-generation",
            task_name=task,
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_name=metric,
            metric_value=round(float(value), 6),
        )
        for task in sorted(scores)
        for metric, value in sorted(scores[task].items())
    ]


def card_data(
    manifest: ExpertManifest,
    scores: dict[str, dict[str, float]] | None,
    licence: str,
    base_origin: str = "",
) -> ModelCardData:
    """The card's Hub metadata."""
    return ModelCardData(
        base_model=base_hub_id(manifest.base_model, base_origin),
        library_name="peft",
        pipeline_tag="text-generation",
        model_name=manifest.expert_id,
        tags=["lora", "taas-factory", f"domain:{manifest.domain}", "mixture-of-experts"],
        eval_results=eval_results(scores) if scores else None,
        **hub_licence(licence, base_origin),
    )


def model_card(
    manifest: ExpertManifest,
    provenance: dict[str, Any],
    scores: dict[str, dict[str, float]] | None,
    licence: str,
    base_scores: dict[str, dict[str, float]] | None = None,
) -> str:
    """The README.md text: Hub metadata, then a short human-readable card.

    The Hub licence is the base's (``manifest.provenance["base_licence"]``, recorded at
    composition; an adapter inherits its base's terms), else ``licence``; the base's origin
    (``base_origin``) gives its real name and licence link.
    """
    base_licence = str(manifest.provenance.get("base_licence") or licence)
    base_origin = str(manifest.provenance.get("base_origin") or "")
    data = card_data(manifest, scores, base_licence, base_origin)
    lines = [
        f"# {manifest.expert_id}",
        "",
        f"A LoRA expert for the **{manifest.domain}** domain on `{data.base_model}` "
        f"(rank {manifest.rank}, alpha {manifest.lora_alpha:g}, on "
        f"{', '.join(manifest.target_modules)}), with router rows for the routed mixture.",
        "",
        "## Provenance",
        "",
        f"- base model: `{manifest.base_model}` ({base_origin or 'origin not recorded'})",
        f"- base model licence: `{base_licence or 'not recorded'}`",
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
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "`adapter_config.json` names the base (`base_model_name_or_path`); see INTEGRATION.md "
        "in an exported bundle for the routed mixture.",
    ]
    card = ModelCard.from_template(data, template_str=_TEMPLATE, body="\n".join(lines))
    return str(card.content)


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
