"""The commission spec: defaults, one-line errors naming the field, shipped examples, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.commission import (
    CommissionSpec,
    load_commission_terms,
    load_spec,
    parse_spec,
    spec_sha256,
)

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
MINIMAL = {"version": 1, "customer": "acme", "domain": "legal", "data": [{"uri": "/d/a.jsonl"}]}


def _spec(**changes) -> dict:
    body = dict(MINIMAL)
    body.update(changes)
    return body


def test_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.base_model.name is None and spec.base_model.preset == "smollm2-135m-instruct"
    assert (spec.expert.rank, spec.expert.alpha) == (8, 16)
    assert spec.expert.target_modules == ["gate_proj", "up_proj", "down_proj"]
    b = spec.budget
    assert (b.cycles, b.steps_per_cycle, b.production_lines, b.processes_per_line) == (3, 30, 2, 2)
    assert (b.batch_size, b.learning_rate, b.seq_len, b.token_cap, b.zero_stage) == (
        8, 2e-3, 128, None, 2
    )  # fmt: skip
    assert (spec.heldout.fraction, spec.heldout.min_tokens) == (0.1, 2048)
    assert spec.wise_ft.alpha_grid == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert spec.router.schedule == "cosine" and spec.router.top_k == 2
    assert spec.quality.max_bytes == 256 * 1024 * 1024 and spec.quality.max_rows == 5_000_000
    assert spec.data[0].text_field == "text" and spec.data[0].format is None
    assert spec.visibility == "public" and spec.seed == 0 and spec.benchmarks.tasks == []
    assert spec.source_weights() == [1.0]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_load(path):
    spec = load_spec(path)
    assert isinstance(spec, CommissionSpec)
    for source in spec.data:
        assert source.uri.startswith(("s3://", str(path.parent.absolute())))


@pytest.mark.parametrize(
    "body,message",
    [
        (_spec(colour="red"), "spec: unknown field 'colour'; remove it"),
        (_spec(expert={"rank": 8, "rnak": 4}), "spec: unknown field 'expert.rnak'"),
        (_spec(data=[{"uri": "/a", "wieght": 1}]), "spec: unknown field 'data.0.wieght'"),
        ({k: v for k, v in MINIMAL.items() if k != "customer"}, "field 'customer' is required"),
        ({k: v for k, v in MINIMAL.items() if k != "version"}, "add 'version: 1'"),
        (_spec(version=2), "field 'version': Input should be 1"),
        (_spec(domain="Legal Docs"), "field 'domain': use a slug"),
        (_spec(budget={"cycles": "many"}), "field 'budget.cycles': Input should be a valid"),
        (_spec(budget={"zero_stage": 4}), "field 'budget.zero_stage'"),
        (_spec(expert={"target_modules": ["q_proj"]}), "field 'expert.target_modules'"),
        (_spec(data=[{"uri": "/a", "format": "xml"}]), "field 'data.0.format'"),
        (_spec(data=[{"uri": "/a", "template": "no fields"}]), "field 'data.0.template'"),
        (_spec(data=[]), "field 'data'"),
        (_spec(heldout={"fraction": 1.5}), "field 'heldout.fraction'"),
        (_spec(router={"schedule": "step"}), "field 'router.schedule'"),
        (_spec(licence={"type": "usage", "weight_fee": "ten"}), "field 'licence.weight_fee'"),
        (_spec(visibility="secret"), "field 'visibility'"),
        (
            _spec(data=[{"uri": "/a", "weight": 0.5}, {"uri": "/b", "weight": 0.4}]),
            "data.weight: weights sum to 0.9; make them sum to 1",
        ),
        (
            _spec(data=[{"uri": "/a", "weight": 0.5}, {"uri": "/b"}]),
            "data.weight: give a weight for every source or for none",
        ),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_field(body, message):
    with pytest.raises(ValueError) as info:
        parse_spec(body)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_weights_within_tolerance_and_hash_is_canonical():
    body = _spec(data=[{"uri": "/a", "weight": 0.3}, {"uri": "/b", "weight": 0.7 + 5e-7}])
    spec = parse_spec(body)
    assert spec.source_weights() == [0.3, 0.7 + 5e-7]
    reordered = dict(reversed(list(MINIMAL.items())))
    assert spec_sha256(parse_spec(reordered)) == spec_sha256(parse_spec(MINIMAL))
    assert spec_sha256(parse_spec(_spec(seed=1))) != spec_sha256(parse_spec(MINIMAL))
    assert len(spec_sha256(spec)) == 64


def test_load_spec_errors_and_relative_paths(tmp_path):
    with pytest.raises(ValueError, match="spec: no such file"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncustomer: [unclosed\n")
    with pytest.raises(ValueError, match=r"spec: malformed YAML at line \d+"):
        load_spec(bad)
    good = tmp_path / "sub" / "spec.yaml"
    good.parent.mkdir()
    good.write_text(
        "version: 1\ncustomer: a\ndomain: law\ndata:\n  - uri: data/x.jsonl\n"
        "  - uri: ../escape.jsonl\n  - uri: s3://bucket-a/p\n"
    )
    uris = [s.uri for s in load_spec(good).data]
    assert uris == [
        str(good.parent / "data" / "x.jsonl"),
        str(good.parent / ".." / "escape.jsonl"),  # kept visible for the URI validator
        "s3://bucket-a/p",
    ]


def test_commission_terms_give_their_sections_and_bad_ones_are_one_line(tmp_path):
    terms_file = tmp_path / "terms.yaml"
    terms_file.write_text("budget: {cycles: 1, steps_per_cycle: 8}\nrouter: {steps: 4}\n")
    terms = load_commission_terms(terms_file)
    # only what the file gives: every other section and field keeps the spec's default
    assert terms.sections() == {
        "budget": {"cycles": 1, "steps_per_cycle": 8},
        "router": {"steps": 4},
    }
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_commission_terms(empty).sections() == {}
    cases = {
        "budget: {cycles: 0}\n": "commission terms: field 'budget.cycles': Input should be greater",
        "data: []\n": "commission terms: unknown field 'data'",
        "budget: [\n": "commission terms: malformed YAML at line",
    }
    for text, message in cases.items():
        terms_file.write_text(text)
        with pytest.raises(ValueError) as caught:
            load_commission_terms(terms_file)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value), text
    with pytest.raises(ValueError, match="^commission terms: no such file"):
        load_commission_terms(tmp_path / "absent.yaml")
