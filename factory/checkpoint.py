"""Resumable training checkpoints: atomic, verified, the last k kept.

A checkpoint is a committed folder (:func:`infra.atomic.committed_dir`) named ``step-<n>`` under
the line's checkpoint dir. It holds

- ``engine/``: DeepSpeed's own ``save_checkpoint`` output (module, optimizer and scheduler state;
  under ZeRO 1-3 one optimizer shard per rank), so resume works for every ZeRO stage;
- ``adapter_model.safetensors``: the gathered LoRA tensors (for inspection and fallbacks);
- ``rng-rank<r>.safetensors`` + ``state.json``: each rank's RNG states (python, numpy, torch) and
  the data position (the next step; the data order is a pure function of seed, shard and step).

Every rank writes into the same temporary folder (the checkpoint dir must therefore be on a
shared file system for multi-node lines); rank 0 writes the marker listing every file's sha256
and renames the folder into place, so a crash mid-save leaves no folder a reader would take.
:func:`latest_valid` returns the newest folder whose marker matches, skipping torn ones (marker
missing, a file truncated, a byte flipped). DeepSpeed's files are read back through
:class:`WeightsOnlyCheckpointEngine`: ``torch.load(weights_only=True)`` with an allow-list of the
three plain DeepSpeed records its optimizer states contain, never an arbitrary unpickler, and only
after the folder's sha256 marker was verified.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from infra.atomic import committed_dir, verify_committed

# The layout (names, listing, the newest valid folder, pruning) is read by a pool line's flow
# run, which never imports torch (a flow-run process starts in seconds less for it); the
# functions that save and restore state import it themselves.
if TYPE_CHECKING:
    import torch

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
STATE_FILE = "state.json"
ADAPTER_FILE = "adapter_model.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every finished-looking checkpoint folder, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_valid(root: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose marker and file hashes verify; torn ones are skipped."""
    for step, folder in reversed(list_checkpoints(root)):
        if verify_committed(folder):
            return step, folder
    return None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Removes all but the newest ``keep_last`` valid checkpoints, every torn one older than the
    newest valid checkpoint and leftover temp folders; returns the removed checkpoint folders.
    Call it only between saves (rank 0 does, right after its own save)."""
    entries = list_checkpoints(root)
    valid = [(s, f) for s, f in entries if verify_committed(f)]
    keep = {f for _, f in valid[-keep_last:]}
    newest = valid[-1][0] if valid else -1
    removed = []
    # Temp folders of saves killed before their rename: never valid, only taking space.
    for stale in Path(root).glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for step, folder in entries:
        if folder in keep or step > newest:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states as (tensors for safetensors, JSON-able python/numpy state)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return {"torch": torch.get_rng_state()}, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])


def write_rank_state(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, plain = rng_state()
    save_file(tensors, str(Path(folder) / f"rng-rank{rank}.safetensors"))
    (Path(folder) / f"rng-rank{rank}.json").write_text(json.dumps(plain))


def read_rank_state(folder: Path, rank: int) -> None:
    """Restores this rank's RNG states; a checkpoint from another world size has none: ignored."""
    from safetensors.torch import load_file

    tensors_path = Path(folder) / f"rng-rank{rank}.safetensors"
    if tensors_path.is_file():
        plain = json.loads((Path(folder) / f"rng-rank{rank}.json").read_text())
        set_rng_state(load_file(str(tensors_path)), plain)


def save(
    root: Path,
    step: int,
    engine,
    adapter: dict[str, torch.Tensor] | None,
    state: dict,
    rank: int,
    barrier,
    broadcast_path,
    on_files_written=None,
) -> Path:
    """Collective save of checkpoint ``step``: every rank calls it with the same arguments.

    ``adapter`` is the gathered LoRA state (rank 0 only), ``state`` a JSON-able dict (data
    position, tokens seen, config hash). ``barrier()`` and ``broadcast_path(path_or_None)`` are the
    process group's collectives (passed in so this module stays free of the launcher);
    ``on_files_written`` runs on rank 0 after every file is written and before the marker.
    """
    final = Path(root) / checkpoint_name(step)
    if rank == 0:
        with committed_dir(final, overwrite=True) as tmp:
            broadcast_path(str(tmp))
            _write_all(tmp, engine, adapter, state, rank)
            barrier()
            if on_files_written is not None:
                on_files_written()
        barrier()
    else:
        tmp = Path(broadcast_path(None))
        _write_all(tmp, engine, None, state, rank)
        barrier()
        barrier()
    return final


def _write_all(tmp: Path, engine, adapter, state: dict, rank: int) -> None:
    from safetensors.torch import save_file

    engine.save_checkpoint(
        str(tmp / ENGINE_DIR),
        tag=ENGINE_TAG,
        client_state={},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    write_rank_state(tmp, rank)
    if rank == 0:
        if adapter is not None:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, sort_keys=True))


def _safe_deepspeed_globals() -> list:
    """The DeepSpeed classes a ZeRO checkpoint pickles: plain records, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_engine(config_params=None):
    """A DeepSpeed checkpoint engine whose ``load`` is ``torch.load(weights_only=True)``."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(config_params)


def load(folder: Path, engine, rank: int) -> dict:
    """Restores engine (weights, optimizer, scheduler) and this rank's RNG; returns state.json."""
    folder = Path(folder)
    engine.checkpoint_engine = weights_only_engine(engine._config)
    engine.load_checkpoint(
        str(folder / ENGINE_DIR),
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    read_rank_state(folder, rank)
    return json.loads((folder / STATE_FILE).read_text())
