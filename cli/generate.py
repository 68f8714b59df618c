"""``taas generate``: try a routed mixture of experts on a prompt and see which expert wrote what.

    taas generate --experts legal-v3,/path/to/expert --prompt "..." [--max-new-tokens N]

Each ``--experts`` item is an expert name resolved through the library (when the library module
is installed) or else an expert folder. The base model is ``--base``, else the settings'
``base_model_dir``, else the built-in preset whose name the experts' manifests carry; its hash
must match theirs. ``--chat`` sends the prompt as a user turn through the base's chat template.
Prints the generated text, then one line per token: the token and its route.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

_LIBRARY_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(@[A-Za-z0-9_.-]+)?$")


def _library_resolver() -> Callable[[str], Path] | None:
    try:
        from factory.library import ExpertLibrary
    except ImportError:  # the library is optional here: plain folders still work
        return None
    from infra.settings import get_settings

    def resolve(name: str) -> Path:
        if not _LIBRARY_REF.match(name):  # a path, not NAME[@REF]: never opens the registry
            raise ValueError(f"{name!r} is not NAME, NAME@ALIAS or NAME@VERSION")
        return ExpertLibrary(get_settings()).resolve_expert_folder(name)

    return resolve


def resolve_folders(values: list[str], resolver: Callable[[str], Path] | None = None) -> list[Path]:
    """Expert folders for names or paths; a name the resolver knows wins over a relative path."""
    resolver = resolver if resolver is not None else _library_resolver()
    folders = []
    for value in values:
        folder, why = None, "no library lookup available"
        if resolver is not None and not Path(value).is_dir():
            try:
                folder = Path(resolver(value))
            except Exception as exc:  # noqa: BLE001 - any lookup failure falls back to a path
                why = f"library lookup: {type(exc).__name__}: {exc}"
        folder = folder or Path(value)
        if not folder.is_dir():
            raise ValueError(
                f"--experts: {value!r} is neither a library expert nor a folder ({why})"
            )
        folders.append(folder)
    return folders


def _base_folder(explicit: Path | None, manifests) -> Path:
    from factory.base_model import (
        PRESETS,
        REAL_PRESETS,
        base_model_sha256,
        folder_ref,
        resolve_base_model,
    )
    from factory.commission import BaseModelSection
    from infra.settings import get_settings

    wanted = {m.base_model_sha256 for m in manifests}
    if len(wanted) != 1:
        raise ValueError("--experts: the experts were trained on different base models")
    settings = get_settings()
    if explicit is not None:
        folder = folder_ref(explicit).path  # checked like a spec's base_model.path
    elif settings.base_model_dir is not None:
        folder = resolve_base_model(BaseModelSection(), settings).path
    else:
        names = {m.base_model for m in manifests}
        known = {p.name: key for key, p in [*PRESETS.items(), *REAL_PRESETS.items()]}
        presets = [known[n] for n in sorted(names) if n in known]
        if not presets:
            raise ValueError(f"--base: no built-in preset named {sorted(names)}; pass --base")
        settings.ensure_home()
        folder = resolve_base_model(BaseModelSection(preset=presets[0]), settings).path
    if base_model_sha256(Path(folder)) not in wanted:
        raise ValueError(f"--base: {folder} is not the base model the experts were trained on")
    return Path(folder)


def load_generate_mixture(folders: list[Path], base: Path | None, top_k: int):
    """(mixture, tokenizer) for ``taas generate``: the base the experts' manifests name, and the
    mixture :func:`factory.mixture.load_mixture` builds from the folders (null route included)."""
    from factory.base_model import load_base
    from factory.expert import read_manifest
    from factory.mixture import load_mixture

    model, tokenizer = load_base(_base_folder(base, [read_manifest(f) for f in folders]))
    return load_mixture(model.eval(), folders, top_k=top_k), tokenizer


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from factory.base_model import format_prompt
    from factory.mixture import generate_with_routes

    names = [v.strip() for v in args.experts.split(",") if v.strip()]
    if not names:
        raise ValueError("--experts: give at least one expert name or folder")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    mixture, tokenizer = load_generate_mixture(resolve_folders(names), args.base, args.top_k)
    torch.manual_seed(args.seed)
    prompt = format_prompt(tokenizer, args.prompt, chat=args.chat)
    text, routed = generate_with_routes(
        mixture, tokenizer, prompt, args.max_new_tokens, greedy=not args.sample, seed=args.seed
    )
    print(args.prompt + text)
    for token, route in routed:
        print(f"{token!r}\t{route}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate with a routed mixture of experts")
    parser.add_argument(
        "--experts",
        required=True,
        help="comma-separated: registered NAME or NAME@ALIAS/VERSION, or expert folders",
    )
    parser.add_argument(
        "--prompt", required=True, help="the text to continue (or a user turn with --chat)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--base", type=Path, default=None, help="base model folder")
    parser.add_argument("--top-k", type=int, default=2, help="experts routed per token")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample")
    parser.add_argument(
        "--chat", action="store_true", help="the prompt is a user turn: apply the chat template"
    )
    parser.set_defaults(handler=run_generate)
