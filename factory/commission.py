"""The commission spec: what a customer orders, as one validated, hashable YAML document.

A spec file starts with ``version: 1``; every section is a strict pydantic model (unknown keys are
errors). :func:`load_spec` turns any problem (missing file, malformed YAML, wrong type, unknown
key) into a one-line ``ValueError`` naming the dotted field and the fix. Relative local data paths
are resolved against the spec file's folder. :func:`spec_sha256` is the sha256 of the canonical
JSON of the validated spec; it identifies the commission in provenance.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from factory.hashing import json_sha256
from merging.methods import MethodName

FORMATS = ("jsonl", "json", "parquet", "csv", "txt")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(_Section):
    uri: str = Field(min_length=1)
    format: Literal["jsonl", "json", "parquet", "csv", "txt"] | None = None
    text_field: str = "text"
    template: str | None = None
    weight: float | None = Field(default=None, gt=0, le=1)

    @field_validator("template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is not None and not template_fields(value):
            raise ValueError("template needs at least one {field} placeholder")
        return value


BASE_PRESETS = ("smollm2-135m-instruct", "demo", "tiny")


class BaseModelSection(_Section):
    """The shared base, named one way: ``path`` (a local Hugging Face folder), ``gguf`` (a local
    GGUF file, imported once) or ``preset`` (built in; the default, when none is given, is
    ``smollm2-135m-instruct``). ``name`` labels it in provenance (default: the base's own name).
    Checked and resolved by :func:`factory.base_model.resolve_base_model`."""

    name: str | None = Field(default=None, min_length=1)
    path: Path | None = None
    gguf: Path | None = None
    preset: Literal["smollm2-135m-instruct", "demo", "tiny"] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> BaseModelSection:
        given = [k for k in ("path", "gguf", "preset") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"name the base one way: path, gguf or preset (got {given})")
        if not given:
            object.__setattr__(self, "preset", BASE_PRESETS[0])
        return self


class ExpertSection(_Section):
    rank: int = Field(default=8, ge=1, le=512)
    alpha: float = Field(default=16, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(MLP_TARGETS), min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _subset(cls, value: list[str]) -> list[str]:
        bad = [m for m in value if m not in MLP_TARGETS]
        if bad:
            raise ValueError(f"{bad} not allowed; use a subset of {list(MLP_TARGETS)}")
        return value


class BudgetSection(_Section):
    cycles: int = Field(default=3, ge=1)
    steps_per_cycle: int = Field(default=30, ge=1)
    production_lines: int = Field(default=2, ge=1)
    processes_per_line: int = Field(default=2, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    seq_len: int = Field(default=128, ge=8, le=8192)
    token_cap: int | None = Field(default=None, ge=1)
    zero_stage: int = Field(default=2, ge=0, le=3)


class HeldoutSection(_Section):
    """The held-out split, and how much of it each evaluation reads: Proof-of-Loss scores on
    ``pol_batches`` seeded batches (fewer when the split has fewer distinct batches; BlockZero's
    validator uses 51), composition and the router's checks on the first ``eval_blocks`` blocks
    of each domain's held-out set."""

    fraction: float = Field(default=0.1, gt=0, lt=1)
    min_tokens: int = Field(default=2048, ge=1)
    pol_batches: int = Field(default=16, ge=1, le=1024)
    eval_blocks: int = Field(default=256, ge=1)


class MergeSection(_Section):
    """The cycle's merge: exactly the fields of :class:`merging.cycle_merge.MergeConfig` (which
    the cycle validates from it), with defaults; ``space`` is a registered merge method."""

    space: MethodName = "delta"
    outer_lr: float = Field(default=1.0, gt=0)
    top_k: int | None = Field(default=None, ge=1)
    power: float = Field(default=1.0, gt=0)
    nesterov_momentum: float = Field(default=0.0, ge=0, lt=1)
    min_gain: float = Field(default=0.0, ge=0)


class WiseFtSection(_Section):
    alpha_grid: list[float] = Field(
        default_factory=lambda: [round(i / 10, 1) for i in range(11)], min_length=1
    )
    regression_budget: float = Field(default=0.01, ge=0)

    @field_validator("alpha_grid")
    @classmethod
    def _unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in value):
            raise ValueError("every alpha must lie in [0, 1]")
        return sorted(set(value))


class RouterSection(_Section):
    """Router annealing; :meth:`merging.router_annealing.AnnealConfig.for_commission` turns it
    into the annealer's config (same field names)."""

    steps: int = Field(default=40, ge=0)
    lr: float = Field(default=5e-2, gt=0)
    temperature_start: float = Field(default=2.0, gt=0)
    temperature_end: float = Field(default=0.3, gt=0)
    schedule: Literal["cosine", "linear", "exponential"] = "cosine"
    load_balance: float = Field(default=0.0, ge=0)
    top_k: int = Field(default=2, ge=1)


class BenchmarksSection(_Section):
    """Extra lm-eval tasks, and ``limit``: at most that many items of every task (None: all)."""

    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)


# The prices a commission may set; the library keeps them as tags of these names.
PRICE_TAGS = ("price_per_1k_tokens", "weight_fee", "maintenance_fee", "exclusive_premium")
MAX_AMOUNT = Decimal(10) ** 15  # any fee or price; larger breaks cent-exact statements
MAX_PLACES = 12


def amount(value: Any) -> Decimal:
    """``value`` as a finite Decimal >= 0 (money is never float); ValueError otherwise."""
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal amount; write it like '0.002'") from None
    if not parsed.is_finite() or parsed < 0:
        raise ValueError(f"{value!r} must be a finite amount >= 0")
    # Bounded so invoices and statements (cents, 28-digit Decimal context) stay exact and a
    # '1e999999999' is refused here, not after training; checked before any formatting.
    _, digits, exponent = parsed.as_tuple()
    places = -exponent - (len(digits) - len("".join(map(str, digits)).rstrip("0")))
    if parsed >= MAX_AMOUNT or (parsed and places > MAX_PLACES):
        raise ValueError(f"{value!r} must be below 1e15, with at most {MAX_PLACES} decimals")
    return parsed


def price_amount(field_name: str, value: Any) -> str:
    """``value`` as a canonical decimal string >= 0; ValueError naming ``field_name``."""
    try:
        parsed = amount(value)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None
    return format(parsed, "f")  # plain digits: "1e3" is stored as "1000"


class LicenceSection(_Section):
    type: Literal["usage", "weight", "exclusive"]
    price_per_1k_tokens: str | None = None
    weight_fee: str | None = None
    maintenance_fee: str | None = None
    exclusive_premium: str | None = None

    @field_validator(*PRICE_TAGS)
    @classmethod
    def _decimal(cls, value: str | None) -> str | None:
        if value is None:
            return None
        amount(value)  # pydantic names the field
        return str(value)


class QualitySection(_Section):
    min_chars: int = Field(default=20, ge=0)
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_rows: int = Field(default=5_000_000, ge=1)


WARM_START_PATTERN = r"^(none|auto|[A-Za-z0-9][A-Za-z0-9._-]{0,199}(@[A-Za-z0-9_-]{1,64})?)$"


class CommissionSpec(_Section):
    version: Literal[1]
    customer: str = Field(min_length=1, max_length=200)
    domain: str
    description: str = ""
    data: list[DataSource] = Field(min_length=1)
    base_model: BaseModelSection = Field(default_factory=BaseModelSection)
    expert: ExpertSection = Field(default_factory=ExpertSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    heldout: HeldoutSection = Field(default_factory=HeldoutSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    wise_ft: WiseFtSection = Field(default_factory=WiseFtSection)
    router: RouterSection = Field(default_factory=RouterSection)
    benchmarks: BenchmarksSection = Field(default_factory=BenchmarksSection)
    licence: LicenceSection | None = None
    visibility: Literal["public", "private", "exclusive"] = "public"
    seed: int = Field(default=0, ge=0)
    quality: QualitySection = Field(default_factory=QualitySection)
    # Where the production lines start: "none" (the base), "auto" (the library's best match on
    # the commission's own held-out split, when it beats the base by
    # evaluation.library_match.WARM_START_MARGIN), or a library expert NAME[@alias|@version].
    warm_start: str = Field(default="none", pattern=WARM_START_PATTERN)
    # The folder of the spec file it was loaded from: the only data root when TAAS_DATA_ROOTS is
    # unset (see factory.data.uri). Private, so it is not part of the spec or its hash.
    _spec_dir: Path | None = PrivateAttr(default=None)

    @property
    def spec_dir(self) -> Path | None:
        return self._spec_dir

    @field_validator("domain")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("use a slug: 2-63 chars of a-z, 0-9 and '-', starting alphanumeric")
        return value

    @model_validator(mode="after")
    def _weights(self) -> CommissionSpec:
        given = [s.weight for s in self.data]
        if all(w is None for w in given):
            return self
        if any(w is None for w in given):
            raise ValueError("data.weight: give a weight for every source or for none")
        total = sum(w for w in given if w is not None)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.weight: weights sum to {total:.6g}; make them sum to 1")
        return self

    def source_weights(self) -> list[float]:
        """Each source's share of the training mixture (equal when no weight is given)."""
        if all(s.weight is None for s in self.data):
            return [1.0 / len(self.data)] * len(self.data)
        return [float(s.weight or 0.0) for s in self.data]


def template_fields(template: str) -> list[str]:
    """The placeholder names of a ``str.format`` template, in order of appearance."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _one_line(exc: ValidationError, source: str = "spec") -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or source
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown field '{where}'; remove it or check its spelling{more}"
    if err["type"] == "missing":
        return f"{source}: field '{where}' is required; add it{more}"
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return f"{source}: {message}{more}"
    if err["type"] in ("literal_error", "enum"):
        message = f"{message}, got {err.get('input')!r}"
    return f"{source}: field '{where}': {message}; fix it in the {source}{more}"


def parse_spec(data: Any, base_dir: Path | None = None) -> CommissionSpec:
    """Validates a spec mapping; relative local data paths are joined onto ``base_dir``."""
    if not isinstance(data, dict):
        raise ValueError("spec: the file must hold a mapping starting with 'version: 1'")
    if "version" not in data:
        raise ValueError("spec: field 'version' is required; add 'version: 1' at the top")
    if base_dir is not None and isinstance(data.get("data"), list):
        data = dict(data, data=[_resolve_source(s, base_dir) for s in data["data"]])
    if base_dir is not None and isinstance(data.get("base_model"), dict):
        data = dict(data, base_model=_resolve_base_paths(data["base_model"], base_dir))
    try:
        return CommissionSpec.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


def _resolve_source(source: Any, base_dir: Path) -> Any:
    if not isinstance(source, dict) or not isinstance(source.get("uri"), str):
        return source
    uri = source["uri"]
    if not uri or _SCHEME.match(uri) or uri.startswith(("/", "~", "\\")):
        return source
    # Joined, not resolved: '..' must stay visible to the URI validator.
    return dict(source, uri=str(Path(base_dir).absolute() / uri))


def _resolve_base_paths(section: dict, base_dir: Path) -> dict:
    """base_model.path / .gguf relative to the spec file's folder, like data URIs."""
    return {
        k: str(Path(base_dir).absolute() / Path(v).expanduser())
        if k in ("path", "gguf") and isinstance(v, str) and v
        else v
        for k, v in section.items()
    }


def _read_yaml(path: Path, source: str) -> Any:
    """A YAML file's content; a missing file, non-UTF-8 text or bad YAML is a one-line
    ValueError starting with ``source``."""
    if not path.is_file():
        raise ValueError(f"{source}: no such file {path}; check the path")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{source}: {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ValueError(f"{source}: malformed YAML{where} ({problem}); fix the syntax") from None


class CommissionTerms(_Section):
    """The spec sections a marketplace sets for every commission its buyers submit (a buyer
    chooses only the data, domain, visibility and warm start); an absent section takes the
    spec's defaults. ``taas marketplace serve --commission-terms FILE`` reads them."""

    expert: ExpertSection | None = None
    budget: BudgetSection | None = None
    heldout: HeldoutSection | None = None
    router: RouterSection | None = None
    benchmarks: BenchmarksSection | None = None

    def sections(self) -> dict[str, Any]:
        """The given sections as a spec holds them (their own unset fields left out)."""
        return {
            name: section.model_dump(mode="json", exclude_unset=True)
            for name in type(self).model_fields
            if (section := getattr(self, name)) is not None
        }


def load_commission_terms(path: Path | str) -> CommissionTerms:
    """Reads and validates a commission-terms file; every problem is a one-line ValueError."""
    data = _read_yaml(Path(path), "commission terms")
    try:
        return CommissionTerms.model_validate(data or {})
    except ValidationError as exc:
        raise ValueError(_one_line(exc, "commission terms")) from None


def load_spec(path: Path | str) -> CommissionSpec:
    """Reads and validates a spec file; every problem is a one-line ValueError."""
    path = Path(path)
    data = _read_yaml(path, "spec")
    spec = parse_spec(data, base_dir=path.parent)
    spec._spec_dir = path.parent.absolute()
    return spec


def spec_sha256(spec: CommissionSpec) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the validated spec; a
    ``warm_start: none`` (the default) is left out, so specs written before the field keep
    their hash (and their commission id)."""
    dumped = spec.model_dump(mode="json")
    if dumped.get("warm_start") == "none":
        del dumped["warm_start"]
    return json_sha256(dumped)
