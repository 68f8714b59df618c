"""Writes the sample data the example specs name, so each validates and runs as shipped.

    .venv/bin/python examples/data/make_sample_data.py

The files are committed; this script is how they were made (seeded, so a rerun writes the same
bytes). Tickets, clinical Q&A and clinical notes are synthetic (combinations of fixed phrases,
no real person or patient); ``examples/licences.jsonl`` holds licence paragraphs of installed
Python packages, as ``taas demo`` writes them (:func:`factory.corpus.licence_paragraphs`).
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

PRODUCTS = ["the Aria router", "the Nimbus backup plan", "the Pixel scanner", "the Orbit app",
            "the Vega thermostat", "the Quill notebook sync", "the Atlas VPN", "the Tidal speaker",
            "the Ember smart plug", "the Cobalt invoice portal", "the Helix fitness band",
            "the Juniper mail client"]  # fmt: skip
ISSUES = ["stops responding after the latest update", "will not accept my password",
          "shows an error code E42 on start-up", "keeps disconnecting every few minutes",
          "charged me twice this month", "does not sync with my phone any more",
          "lost all of my saved settings", "is much slower than it used to be",
          "sends me notifications I never asked for", "cannot find my account",
          "fails halfway through the installation", "shows the wrong time zone"]  # fmt: skip
STEPS = ["hold the reset button for ten seconds until the light blinks twice",
         "sign out on every device, then sign in again on one of them first",
         "open Settings, choose Advanced and switch off battery optimisation for it",
         "remove the old pairing and pair it again from the app's Devices page",
         "clear the app's cache and restart it", "install version 4.2.1, which fixes this",
         "check that the firmware shows 2.8 or later under About",
         "move it closer to the base station while it finishes the first sync"]  # fmt: skip
CLOSINGS = ["If it happens again, reply to this message and we will escalate it.",
            "I have also added a note to your account so the next agent sees the history.",
            "A refund for the duplicate charge will reach your card within five working days.",
            "Thank you for your patience while we looked into this.",
            "You can follow the fix on our status page under incident reports."]  # fmt: skip

CONDITIONS = ["seasonal allergies", "a sprained ankle", "mild hypertension", "type 2 diabetes",
              "a tension headache", "iron-deficiency anaemia", "a chest cold",
              "lower back strain", "eczema on both hands", "mild asthma"]  # fmt: skip
ADVICE = ["rest, fluids and a follow-up visit in two weeks",
          "a daily walk of thirty minutes and a low-salt diet",
          "an antihistamine at night and a saline nasal rinse",
          "ice for twenty minutes three times a day and a compression bandage",
          "checking blood glucose before breakfast and after dinner",
          "an iron supplement with orange juice and a blood test in six weeks",
          "a steroid cream twice a day and fragrance-free soap",
          "a reliever inhaler before exercise and a written asthma action plan"]  # fmt: skip
FINDINGS = ["blood pressure 138/86", "temperature 37.4 C", "pulse 72 and regular",
            "no swelling of the lymph nodes", "clear breath sounds on both sides",
            "tenderness over the lateral ligament", "fasting glucose 7.1 mmol/L",
            "haemoglobin 10.9 g/dL"]  # fmt: skip


def tickets(rng: random.Random, n: int) -> list[str]:
    rows = set()
    while len(rows) < n:
        product, issue = rng.choice(PRODUCTS), rng.choice(ISSUES)
        steps = rng.sample(STEPS, 2)
        number = rng.randint(10_000, 99_999)
        rows.add(
            f"Ticket {number}. Customer: Hello, {product} {issue}. What can I do?\n"
            f"Agent: Thanks for reaching out, and sorry for the trouble with {product}. "
            f"Please {steps[0]}. If that does not help, {steps[1]}. {rng.choice(CLOSINGS)}"
        )
    return sorted(rows)


def clinical_qa(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows: dict[str, str] = {}
    while len(rows) < n:
        condition, advice = rng.choice(CONDITIONS), rng.choice(ADVICE)
        age = rng.randint(18, 85)
        question = (f"A {age}-year-old patient with {condition} asks what to do at home "
                    f"(visit {rng.randint(100, 999)}).")  # fmt: skip
        rows[question] = (f"For {condition} we usually suggest {advice}; the patient should come "
                          f"back sooner if symptoms get worse or new ones appear.")  # fmt: skip
    return [{"question": q, "answer": a} for q, a in sorted(rows.items())]


def clinical_notes(rng: random.Random, n: int) -> list[str]:
    rows = set()
    while len(rows) < n:
        condition, findings = rng.choice(CONDITIONS), rng.sample(FINDINGS, 2)
        rows.add(
            f"Note {rng.randint(1000, 9999)}: seen today for follow-up of {condition}. "
            f"On examination {findings[0]}, {findings[1]}. Plan: {rng.choice(ADVICE)}. "
            f"Next review in {rng.randint(2, 12)} weeks."
        )
    return sorted(rows)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    from factory.corpus import licence_paragraphs

    rng = random.Random(0)
    _jsonl(HERE / "tickets.jsonl", [{"text": t} for t in tickets(rng, 700)])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["question", "answer"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(clinical_qa(rng, 600))
    (HERE / "clinical_qa.csv").write_text(out.getvalue())
    _jsonl(HERE / "clinical_notes.jsonl", [{"body": t} for t in clinical_notes(rng, 500)])
    paragraphs = sorted(licence_paragraphs())
    kept, size = [], 0
    for para in paragraphs:  # about 160 KB: enough held-out tokens for the demo spec
        if size > 160_000:
            break
        kept.append({"text": para})
        size += len(para)
    _jsonl(HERE.parent / "licences.jsonl", kept)


if __name__ == "__main__":
    main()
