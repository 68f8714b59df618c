"""The commission summary's own-route shares and how the demo prints them."""

from __future__ import annotations

from flows.commission import print_summary
from tasks.summary import own_route_shares

STATS = {
    "legal-acme-1": {"legal-acme-1": 0.875, "code-x-2": 0.025, "base": 0.1},
    "general": {"legal-acme-1": 0.3, "code-x-2": 0.1, "base": 0.6},
    "code-x-2": {"legal-acme-1": 0.2, "code-x-2": 0.7, "base": 0.1},
}


def test_each_domain_counts_its_own_route():
    assert own_route_shares("legal-acme-1", STATS) == {
        "legal-acme-1": 0.875,  # the new expert's domain on the new expert
        "general": 0.6,  # general text on the null route
        "code-x-2": 0.7,  # another expert's replay on that expert
    }
    assert own_route_shares("legal-acme-1", {"other": {"base": 1.0}}) == {"other": 0.0}


def test_the_summary_prints_the_shares(capsys):
    summary = {
        "commission_id": "c-1",
        "expert_id": "legal-acme-1",
        "pol": {"cycle-1": {"line-0": 0.25}},
        "alpha": {"cycle-1": 1.0},
        "rejections": {"cycle-1": {}},
        "heldout_loss_base": 3.0,
        "heldout_loss_expert": 2.5,
        "heldout_loss_mixture": 2.6,
        "router_accepted": True,
        "routing_share": own_route_shares("legal-acme-1", STATS),
        "benchmark": {"base": {"taas_general_cloze": {"acc": 0.95}}},
        "registered": None,
        "tracking_uri": "sqlite:///x.db",
    }
    print_summary(summary)
    out = capsys.readouterr().out
    shares = "code-x-2 0.70, general 0.60, legal-acme-1 0.88"
    assert f"own-route share of held-out tokens: {shares}" in out
    assert "held-out loss: base 3.0000 -> expert 2.5000" in out
