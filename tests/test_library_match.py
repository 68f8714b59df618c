"""Library match on two tiny domain experts, the buyer's sample reader, the demand board, and
the parent's share of a warm-started expert's revenue."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from evaluation.library_match import CandidateLoss, match_sample, mean_stderr
from evaluation.match_sample import domain_words, read_sample, sample_blocks
from factory.base_model import load_base
from factory.ledger import Ledger
from marketplace.demand import DemandBoard
from marketplace.licensing import UNALLOCATED, Licensing
from marketplace.lineage import parent_from_tags
from tests.test_mixture_experts import domain_blocks, experts_for


def test_match_ranks_each_domains_own_expert_first(tiny_base):
    digits, licence = experts_for(tiny_base)
    base, _ = load_base(tiny_base.path)
    blocks = domain_blocks(str(tiny_base.path))
    for domain, own in (("digits", "digits-expert"), ("licence", "licence-expert")):
        found = match_sample(base, [licence, digits], blocks[domain][1], batch_size=4)
        assert (found.num_blocks, found.num_batches) == (16, 4)
        assert [c.expert_id for c in found.candidates][0] == own
        best = found.candidates[0]
        # The own expert beats the base clearly and confidently: > 2 standard errors.
        assert best.delta < -0.1 and best.confident and found.best() == best
        assert best.loss == pytest.approx(found.base_loss + best.delta, abs=1e-9)
    # the same numbers as the whole-sample losses of the older library_match (equal batches)
    digits_only = match_sample(base, [digits], blocks["digits"][1], batch_size=16)
    assert digits_only.num_batches == 1 and digits_only.candidates[0].delta_stderr == 0.0


def test_mean_stderr_is_the_sample_standard_error():
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    # sample variance ((-2)^2 + (-1)^2 + 0^2 + 3^2) / (4 - 1) = 14/3; stderr = sqrt(14/3 / 4)
    assert stderr == pytest.approx((14 / 3 / 4) ** 0.5, abs=1e-12)
    assert mean_stderr([0.5]) == (0.5, 0.0)
    close = CandidateLoss("e", 1.0, delta=-0.1, delta_stderr=0.06)
    assert not close.confident and close.beats_base(0.05) and not close.beats_base(0.2)


def test_read_sample_accepts_jsonl_and_text_and_refuses_the_rest():
    rows = [{"text": "alpha beta"}, {"text": "gamma"}]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert read_sample(jsonl, "s.jsonl") == ["alpha beta", "gamma"]
    assert read_sample(b"first para\nstill first\n\n\nsecond", "s.txt") == [
        "first para\nstill first",
        "second",
    ]
    refusals = {
        b"x" * 101: "sample: big.txt is 101 bytes; send at most 100 bytes",
        b"\xff\xfe bad": "sample: big.txt is not UTF-8 text; save it as UTF-8",
        b"  \n ": "sample: big.txt is empty; send some of your text",
        b'{"text": "ok"}\n{"text": 3}\n': (
            "sample: big.txt line 2 has no string field 'text'; add one"
        ),
        b'{"text": "ok"}\n{oops\n': "sample: big.txt line 2 is not JSON; fix it",
    }
    for data, message in refusals.items():
        with pytest.raises(ValueError) as caught:
            read_sample(data, "big.txt", max_bytes=100)
        assert str(caught.value) == message


def test_sample_blocks_and_short_samples(tiny_base):
    _, tokenizer = load_base(tiny_base.path)
    blocks = sample_blocks(["word " * 400], tokenizer, seq_len=32, max_blocks=5)
    assert tuple(blocks.shape) == (5, 32)
    with pytest.raises(ValueError, match="too short; send at least 32 tokens"):
        sample_blocks(["hi"], tokenizer, seq_len=32)


def test_demand_board_records_words_never_text(tmp_path):
    board = DemandBoard(Ledger(f"sqlite:///{tmp_path / 'ledger.db'}").engine)
    secret = "Patient Jane Roe, born 1970, was prescribed warfarin; warfarin dosing per INR."
    words = domain_words([secret, "Warfarin interactions with aspirin and warfarin."])
    assert words == ["warfarin", "aspirin", "born", "dosing", "inr", "interactions", "jane",
                     "patient"]  # fmt: skip
    board.record(words, "match")
    board.record(domain_words(["aspirin dosing"]), "search")
    # counted once per request that asked, most asked first, ties alphabetical
    assert board.domains(3) == [("aspirin", 2), ("dosing", 2), ("born", 1)]
    with pytest.raises(ValueError, match="not lower-case domain words"):
        board.record([secret], "match")
    with pytest.raises(ValueError, match="source"):
        board.record(["word"], "chat")
    stored = tmp_path.joinpath("ledger.db").read_bytes()
    assert b"warfarin" in stored and b"prescribed" not in stored and b"Jane Roe" not in stored


def test_parent_contributors_share_the_refined_experts_revenue(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    # the parent (law v1) was made by alice 3/4 and bob 1/4; the refined expert by carol alone
    ledger.record_shares("law", "com-p/cycle-1", {"alice": Decimal(3), "bob": Decimal(1)}, {})
    ledger.record_shares("law-acme", "com-r/cycle-1", {"carol": Decimal("0.5")}, {})
    commissions = {("law", "1"): "com-p", ("law-acme", "1"): "com-r", ("orphan", "1"): "com-x"}
    tags = {
        ("law-acme", "1"): {"parent_expert": "law", "parent_version": "1", "parent_share": "0.2"},
        ("orphan", "1"): {"parent_expert": "law", "parent_version": "1", "parent_share": "0.5"},
    }
    licensing = Licensing(
        ledger,
        lambda name, version: commissions.get((name, version)),
        lambda name, version: parent_from_tags(tags.get((name, version), {})),
    )
    assert licensing.contributor_shares("law-acme", "1") == {
        "carol": Decimal("0.8"), "alice": Decimal("0.15"), "bob": Decimal("0.05"),
    }  # fmt: skip
    buyer = licensing.create_buyer("Buyer")
    licensing.grant(buyer, "law-acme", "1", "weight", Decimal(0), Decimal("1000.00"), Decimal(0))
    licensing.grant(buyer, "orphan", "1", "weight", Decimal(0), Decimal("10.00"), Decimal(0))
    assert licensing.statement("alice")["lines"] == [
        {"expert": "law-acme", "version": "1", "amount": "150.00"},
        {"expert": "orphan", "version": "1", "amount": "3.75"},
    ]
    assert licensing.statement("bob")["total"] == "51.25"
    assert licensing.statement("carol")["total"] == "800.00"
    # a refined version with no shares of its own: its (1 - s) stays unallocated
    assert licensing.statement(UNALLOCATED)["total"] == "5.00"
    with pytest.raises(ValueError, match="parent_share"):
        parent_from_tags({"parent_expert": "law", "parent_version": "1", "parent_share": "1.5"})
