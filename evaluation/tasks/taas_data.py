"""lm-eval ``custom_dataset`` loader: a task's JSONL files resolved from this file's folder.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves relative
paths against the current folder, so a task folder would work only when ``lm_eval`` runs inside
it. The task YAMLs here name ``custom_dataset: !function taas_data.load`` instead: lm-eval imports
the copy of this file that sits beside the YAML, and relative names resolve from there, wherever
``lm_eval`` runs (absolute names are used as they are). Standalone on purpose: a task folder
copied out of the factory (a reproduction bundle) needs only ``datasets``.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files=None, **_metadata):
    """``{split: Dataset}`` of the JSONL files ``data_files`` names (``{split: file}``)."""
    if not isinstance(data_files, dict) or not data_files:
        raise ValueError("dataset_kwargs.data_files: give {split: file.jsonl} beside the YAML")
    files = {split: str(HERE / name) for split, name in data_files.items()}
    for split, path in files.items():
        if not Path(path).is_file():
            raise ValueError(f"dataset_kwargs.data_files.{split}: no such file {path}")
    return datasets.load_dataset("json", data_files=files)
