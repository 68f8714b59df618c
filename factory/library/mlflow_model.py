"""An expert as an MLflow model: a pyfunc that loads its base by reference and its adapter.

:func:`save_expert_model` writes an MLflow model folder (``MLmodel``, the pickled
:class:`ExpertPyfunc`, ``artifacts/expert/``: the committed expert folder) with a signature and an
input example. The base model is not copied: the model config names its folder and its content
hash (``base_model_path``, ``base_model_sha256``, see :func:`factory.base_model.base_model_sha256`),
and :meth:`ExpertPyfunc.load_context` refuses a folder whose hash differs. On another machine the
base's folder is given at load time::

    mlflow.pyfunc.load_model("models:/expert-legal@champion",
                             model_config={"base_model_path": "/models/SmolLM2-135M-Instruct"})

or with ``TAAS_BASE_MODEL_DIR`` (also what ``mlflow models serve`` reads). Input: a table with
one string column ``prompt``; output: a table with one string column ``text`` (the greedy
continuation of the prompt through the base's chat template); parameter ``max_new_tokens``.

Only the registry calls :func:`save_expert_model`; it writes to a local folder and talks to no
tracking server (the registry logs the folder through :mod:`infra.tracking`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model"  # the run artifact folder that holds the MLflow model
INPUT_EXAMPLE = "Summarize the licensee's obligations in one sentence."
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 512


class ExpertPyfunc(mlflow.pyfunc.PythonModel):
    """Base (by reference, hash-checked) + the expert's LoRA adapter, answering prompts."""

    def load_context(self, context) -> None:
        from peft import PeftModel

        from factory.base_model import base_model_sha256, load_base

        config = dict(context.model_config or {})
        folder = os.environ.get("TAAS_BASE_MODEL_DIR") or config.get("base_model_path") or ""
        if not folder or not Path(folder).is_dir():
            raise ValueError(
                f"base_model_path: no base model folder at {folder!r}; pass model_config="
                "{'base_model_path': DIR} or set TAAS_BASE_MODEL_DIR"
            )
        expected = config.get("base_model_sha256", "")
        found = base_model_sha256(Path(folder))
        if found != expected:
            raise ValueError(
                f"base_model_path: {folder} has sha256 {found}, the expert was trained on "
                f"{expected}; point base_model_path at that base"
            )
        base, tokenizer = load_base(Path(folder))
        self.tokenizer = tokenizer
        self.model = PeftModel.from_pretrained(base, context.artifacts["expert"]).eval()

    # A DataFrame hint tells mlflow not to infer a schema from the hints (the signature is
    # given explicitly, see signature()); without any hint it warns on every definition.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        from factory.base_model import format_prompt

        max_new = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens: {max_new} is outside 1..{MAX_NEW_TOKENS_LIMIT}")
        prompts = _prompts(model_input)
        texts = []
        for prompt in prompts:
            text = format_prompt(self.tokenizer, prompt, chat=True)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            texts.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return pd.DataFrame({"text": texts})


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise ValueError("prompt: the input table needs a string column 'prompt'")
        return [str(p) for p in model_input["prompt"].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, list):
        return [str(p) for p in model_input]
    raise ValueError(f"prompt: expected a table with a 'prompt' column, got {type(model_input)}")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def save_expert_model(
    dest: Path,
    expert_folder: Path,
    base_model_path: Path | None,
    base_model_sha256: str,
    metadata: dict[str, str],
) -> Path:
    """Writes the MLflow model folder ``dest`` (which must not exist) and returns it.

    ``base_model_path`` may be None when this machine has no base folder: loading then needs
    ``model_config={'base_model_path': ...}`` or ``TAAS_BASE_MODEL_DIR``.
    """
    with _without(logging.getLogger("mlflow.pyfunc"), PICKLE_HINT):
        mlflow.pyfunc.save_model(
            path=str(dest),
            python_model=ExpertPyfunc(),
            artifacts={"expert": str(expert_folder)},
            signature=signature(),
            input_example=pd.DataFrame({"prompt": [INPUT_EXAMPLE]}),
            model_config={
                "base_model_path": str(Path(base_model_path).resolve()) if base_model_path else "",
                "base_model_sha256": base_model_sha256,
            },
            metadata={**metadata, "base_model_sha256": base_model_sha256},
            # The venv that registers is the venv that serves (--env-manager local); pinning
            # requirements would make mlflow resolve every installed package on each save.
            pip_requirements=[],
        )
    return Path(dest)


#: mlflow's advice for a python_model given as an object (pickled with cloudpickle). The pickle
#: holds the class and no state (the weights are artifacts, the base is model_config); loading
#: it runs code like any pickle, so the registry's artifact store is trusted as the factory's
#: own. Printed on every registration, it is dropped from the output.
PICKLE_HINT = "Passing a Python object as `python_model`"


@contextmanager
def _without(logger: logging.Logger, message_start: str) -> Iterator[None]:
    class Hint(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(message_start)

    hint = Hint()
    logger.addFilter(hint)
    try:
        yield
    finally:
        logger.removeFilter(hint)
