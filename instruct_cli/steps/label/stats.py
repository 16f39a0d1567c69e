"""Statistics of a labels folder: counts of rankings, skips and flags, agreement between every two labelers
(pairwise agreement and Kendall tau-b, ties allowed), and the `instruct label --stats` tables.

Uses `store` (reading the folder's live judgments and samples) and instruct_cli.core (artifacts, console,
errors).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from pathlib import Path

from instruct_cli.core import artifacts
from instruct_cli.core.console import print_table, summary_table
from instruct_cli.core.errors import UserError
from instruct_cli.steps.label.store import RANKINGS, SampleStore, live_judgments


def kind_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows are rankings, skips and flags."""
    counts = {"ranked": 0, "skipped": 0, "flagged": 0}
    for row in rows:
        kind = "flagged" if row.get("flagged") else "skipped" if row.get("skipped") else "ranked"
        counts[kind] += 1
    return counts


def levels(ranking: list[int], ties: list[list[int]] = ()) -> dict[int, int]:
    """Each response's place in a ranking (0 = best); tied responses share a place: {response: place}."""
    group_of = {index: number for number, group in enumerate(ties) for index in group}
    places, place = {}, -1
    for position, index in enumerate(ranking):
        previous = ranking[position - 1] if position else None
        if not (previous is not None and index in group_of and group_of.get(previous) == group_of[index]):
            place += 1
        places[index] = place
    return places


def pair_signs(places: dict[int, int]) -> dict[tuple[int, int], int]:
    """For every pair i < j: +1 when i is ranked better, -1 when j is, 0 when they are tied."""
    return {
        (i, j): (places[j] > places[i]) - (places[j] < places[i]) for i, j in itertools.combinations(sorted(places), 2)
    }


def pairwise_agreement(a: dict[int, int], b: dict[int, int]) -> tuple[int, int]:
    """(agreeing, compared): over the pairs both rankings order strictly, how many they order the same way."""
    signs_a, signs_b = pair_signs(a), pair_signs(b)
    compared = [pair for pair in signs_a if signs_a[pair] and signs_b.get(pair)]
    return sum(signs_a[pair] == signs_b[pair] for pair in compared), len(compared)


def kendall_tau(a: dict[int, int], b: dict[int, int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (ties allowed); None when undefined."""
    signs_a, signs_b = pair_signs(a), pair_signs(b)
    products = [signs_a[pair] * signs_b[pair] for pair in signs_a]
    concordant, discordant = products.count(1), products.count(-1)
    untied_a = sum(1 for sign in signs_a.values() if sign)
    untied_b = sum(1 for sign in signs_b.values() if sign)
    if not untied_a or not untied_b:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def agreement(rows: list[dict]) -> list[dict]:
    """Agreement of every two labelers on the prompts both ranked: prompts, pairs compared, pairwise agreement
    (pooled over those pairs) and the mean Kendall tau-b over the prompts."""
    by_labeler: dict[str, dict[int, dict[int, int]]] = defaultdict(dict)
    for row in rows:
        if isinstance(row.get("ranking"), list) and not (row.get("skipped") or row.get("flagged")):
            by_labeler[row["labeler"]][row["index"]] = levels(row["ranking"], row.get("ties") or [])
    result = []
    for first, second in itertools.combinations(sorted(by_labeler), 2):
        shared = sorted(set(by_labeler[first]) & set(by_labeler[second]))
        if not shared:
            continue
        agreed = compared = 0
        taus = []
        for index in shared:
            a, b = by_labeler[first][index], by_labeler[second][index]
            if set(a) != set(b):
                continue  # different K: not comparable
            same, count = pairwise_agreement(a, b)
            agreed, compared = agreed + same, compared + count
            tau = kendall_tau(a, b)
            if tau is not None:
                taus.append(tau)
        result.append(
            {
                "labelers": (first, second),
                "prompts": len(shared),
                "pairs": compared,
                "agreement": agreed / compared if compared else None,
                "kendall_tau": statistics.fmean(taus) if taus else None,
            }
        )
    return result


def show_stats(folder: Path) -> None:
    """Print counts, time per judgment and agreement between labelers for a labels folder."""
    if not (folder / RANKINGS).is_file():
        raise UserError(
            "The folder has no rankings.jsonl", where=str(folder), fix="Pass the --out folder of `instruct label`"
        )
    live = live_judgments(artifacts.read_jsonl(folder / RANKINGS))
    samples = SampleStore(folder).indices()
    per_labeler: dict[str, list[dict]] = defaultdict(list)
    for row in live:
        per_labeler[row["labeler"]].append(row)
    rows = []
    for labeler, judged in sorted(per_labeler.items()):
        kinds = kind_counts(judged)
        seconds = [row["seconds"] for row in judged if isinstance(row.get("seconds"), (int, float))]
        rows.append(
            [
                labeler,
                kinds["ranked"],
                kinds["skipped"],
                kinds["flagged"],
                f"{statistics.median(seconds):.1f}" if seconds else "-",
                f"{statistics.fmean(seconds):.1f}" if seconds else "-",
            ]
        )
    print_table(f"Labelers ({folder})", ["labeler", "ranked", "skipped", "flagged", "median s", "mean s"], rows)
    pairs = agreement(live)
    if pairs:
        print_table(
            "Agreement where prompts overlap",
            ["labelers", "prompts", "pairs compared", "pairwise agreement", "Kendall tau-b"],
            [
                [
                    " / ".join(p["labelers"]),
                    p["prompts"],
                    p["pairs"],
                    fmt_fraction(p["agreement"]),
                    fmt_fraction(p["kendall_tau"], signed=True),
                ]
                for p in pairs
            ],
        )
    ranked_by = defaultdict(set)
    for row in live:
        if not (row.get("skipped") or row.get("flagged")):
            ranked_by[row["index"]].add(row["labeler"])
    totals = kind_counts(live)
    all_seconds = [row["seconds"] for row in live if isinstance(row.get("seconds"), (int, float))]
    summary_table(
        "label --stats",
        {
            "prompts sampled": len(samples),
            "judgments": f"{len(live)} ({totals['ranked']} ranked, {totals['skipped']} skipped, {totals['flagged']} flagged)",
            "labelers": len(per_labeler),
            "prompts ranked by 2+ labelers": sum(1 for who in ranked_by.values() if len(who) > 1),
            "time per judgment (median)": f"{statistics.median(all_seconds):.1f} s" if all_seconds else "-",
            "pairwise agreement (all overlaps)": fmt_fraction(pooled_agreement(pairs)),
        },
    )


def pooled_agreement(pairs: list[dict]) -> float | None:
    """Pairwise agreement pooled over every two labelers' compared pairs."""
    compared = sum(p["pairs"] for p in pairs)
    agreed = sum(p["agreement"] * p["pairs"] for p in pairs if p["agreement"] is not None)
    return agreed / compared if compared else None


def fmt_fraction(value: float | None, signed: bool = False) -> str:
    """0.8333 -> `0.833`, None -> `-`."""
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
