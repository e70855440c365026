"""Turning the figures into one table, a JSON file and a plot.

One table on purpose: every figure of a run is measured on the same machine, data and minute,
and reading them side by side (what the cached counts buy next to what they cost) is the point
of the bench. Each row is "A against B" with the ratio that matters and, where the issue set
one, the goal and whether this run met it. The JSON holds the same figures plus every sample,
so two runs can be compared; the plot shows list latency against collection size, and
:func:`plot_scaling` the incremental drain's cost per changed row against the dataset's size,
from the JSON of several runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.timing import ratio

OK, MISSED = "ok", "MISSED"


def _fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def _fmt_x(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f}x" if value >= 20 else f"{value:.2f}x"


def _fmt_fine(value: float | None) -> str:
    """Milliseconds with three significant digits, for per-row figures well below 1 ms."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3g} ms"


def _size(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _verdict(met: bool | None) -> str:
    return "" if met is None else (OK if met else MISSED)


def rows(results: dict) -> list[tuple[str, ...]]:
    """(section, figure, A, B, ratio, goal, verdict) for every figure measured."""
    out: list[tuple[str, ...]] = []
    for section, section_rows in _SECTIONS:
        found = results.get(section)
        if found and "skipped" in found:
            out.append((section, f"not measured: {found['skipped']}", "", "", "", "", ""))
        elif found:
            out += section_rows(found)
    return out


def _list_rows(lst: dict) -> list[tuple[str, ...]]:
    """Each set size against both per-request aggregates, then the flatness of the cached page."""
    out = []
    for r in lst["sizes"]:
        at_goal = r["size"] >= 500_000
        aggregates = (("subquery", "5 Subquery(Count)"), ("count_distinct", "5 Count(distinct)"))
        for key, name in aggregates:
            x = r[f"{key}_ratio"]
            out.append(
                (
                    f"list {_size(r['size'])}",
                    f"page of 25, cached vs {name}" + ("" if r["agree"] else " (DISAGREE)"),
                    _fmt_ms(r["cached_ms"]),
                    _fmt_ms(r[f"{key}_ms"]),
                    _fmt_x(x),
                    "≥ 100x" if at_goal else "",
                    _verdict(x >= 100 if at_goal else None),
                )
            )
    cached = [r["cached_ms"] for r in lst["sizes"]]
    out.append(
        (
            "list",
            f"cached page of 25: slowest (A) ÷ fastest (B) of {len(cached)} set sizes"
            " — flat if the ratio A/B stays small",
            _fmt_ms(max(cached)),
            _fmt_ms(min(cached)),
            _fmt_x(lst["cached_flatness"]),
            "≤ 1.5x",
            _verdict(lst["cached_flatness"] <= 1.5 and lst["agree"]),
        )
    )
    return out


def _write_rows(wr: dict) -> list[tuple[str, ...]]:
    """What the triggers cost each write path, and the whole single-row path (the bulk ones
    and the whole path have a goal)."""
    out = []
    # (figure, what is compared, goal): the bulk paths and the whole single-row path have one.
    rows = [
        ("bulk_create", "triggers on vs off", 1.2),
        ("single_saves", "triggers on vs off", None),
        ("m2m_add", "triggers on vs off", 1.2),
        ("full_path", "on vs off", 1.3),
    ]
    for key, compared, goal in rows:
        if key == "full_path" and key not in wr:  # measured only by newer runs
            continue
        r = wr[key]
        out.append(
            (
                "write",
                f"{r['label']}: {compared}",
                _fmt_ms(r["on_ms"]),
                _fmt_ms(r["off_ms"]),
                _fmt_x(r["ratio"]),
                f"≤ {goal}x" if goal else "",
                _verdict(r["ratio"] <= goal if goal else None),
            )
        )
    return out


def _recompute_rows(rc: dict) -> list[tuple[str, ...]]:
    """The grouped drain against recomputing set by set, by statement and by ORM."""
    out = []
    for key, name in (("statement", "per-set statement"), ("orm", "per-set ORM aggregate")):
        x = rc[f"{key}_ratio"]
        out.append(
            (
                "recompute",
                f"{rc['sets']:,} dirty sets: grouped drain vs {name}"
                + ("" if rc["exact"] else " (NOT EXACT)"),
                _fmt_ms(rc["grouped_ms"]),
                _fmt_ms(rc[f"per_set_{key}_ms"]),
                _fmt_x(x),
                "≥ 10x",
                _verdict(x >= 10 and rc["exact"]),
            )
        )
    new = rc.get("new_set")  # measured only by newer runs
    if new:
        out.append(
            (
                "recompute",
                f"Recompute now of a set of {new['captures']} made after ANALYZE: planner's plan"
                " (A) vs the engine's probes (B); ratio A ÷ B"
                + ("" if new["exact"] else " (NOT EXACT)"),
                _fmt_ms(new["planner_ms"]),
                _fmt_ms(new["engine_ms"]),
                _fmt_x(new["ratio"]),
                "",
                _verdict(None if new["exact"] else False),
            )
        )
    return out


def _burst_rows(bu: dict) -> list[tuple[str, ...]]:
    """Messages per burst of writes, and how long after its last commit the counts are exact."""
    p50, p99 = bu["exact_after_p50_s"], bu["exact_after_p99_s"]
    interpolated = " (p99 interpolated between the two slowest: ≈ the worst seen)"
    return [
        (
            "burst",
            f"{bu['writes']:,} single-row writes over {bu['sets']} sets: messages, med / max",
            f"{bu['messages_median']:g}",
            f"{bu['messages_max']}",
            "",
            "≤ 5",
            _verdict(bu["messages_max"] <= 5),
        ),
        (
            "burst",
            f"last commit → exact counts: median (A) / p99 (B) of {bu['repeats']} bursts"
            + (interpolated if bu["repeats"] < 100 else "")
            + f", debounce {bu['debounce_ms']} ms",
            "—" if p50 is None else f"{p50:.2f} s",
            "—" if p99 is None else f"{p99:.2f} s",
            "",
            "exact",
            _verdict(bu["exact"]),
        ),
    ]


def _fmt_rate(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.0f}/s"


def _reconcile_rows(re: dict) -> list[tuple[str, ...]]:
    """The engine's reconcile against the hand-written statements, repair and dry, one
    statement and chunked: target rows per second, and whether anyone found drift."""
    if "variants" not in re:  # runs before the baseline was measured
        return [
            (
                "reconcile",
                f"targets checked per second ({re['checked']:,} in {re['seconds']:.1f} s,"
                f" {re['drifted_rows']} drifted)",
                _fmt_rate(re["per_second"]),
                "",
                "",
                "no drift",
                _verdict(re["drifted_rows"] == 0),
            )
        ]
    v, out = re["variants"], []
    for mode, what in (("repair", "counts.reconcile()"), ("dry", "counts.reconcile(dry_run=True)")):
        for shape, name in (("baseline", "one statement per table"), ("chunked", "chunked")):
            key = mode + ("_chunked" if shape == "chunked" else "")
            first = mode == "repair" and shape == "baseline"
            out.append(
                (
                    "reconcile",
                    f"{mode}: {what} (A) vs hand-written, {name} (B), target rows/s"
                    + (
                        f" — {re['target_rows']:,} rows, {re['drifted_rows']} drifted;"
                        " B/A = engine time ÷ baseline time"
                        if first
                        else ""
                    )
                    + ("" if re["agree"] or not first else " (DRY PASSES DISAGREE)"),
                    _fmt_rate(v[f"engine_{mode}"]["per_second"]),
                    _fmt_rate(v[f"{shape}_{mode}"]["per_second"]),
                    _fmt_x(re["ratios"][key]),
                    "no drift" if first else "",
                    _verdict(re["drifted_rows"] == 0 and re["agree"]) if first else "",
                )
            )
        if f"parallel_{mode}" in v:
            out.append(
                (
                    "reconcile",
                    f"{mode}: {_with_jobs(what, re['jobs'])} (A) vs hand-written, one"
                    " statement per table (B), target rows/s",
                    _fmt_rate(v[f"parallel_{mode}"]["per_second"]),
                    _fmt_rate(v[f"baseline_{mode}"]["per_second"]),
                    _fmt_x(re["ratios"][f"{mode}_parallel"]),
                    "",
                    "",
                )
            )
    return out


def _with_jobs(call: str, jobs: int) -> str:
    """``counts.reconcile()`` -> ``counts.reconcile(jobs=2)``; with arguments, one more."""
    head, args = call[:-1].split("(", 1)
    return f"{head}({args}{', ' if args else ''}jobs={jobs})"


def _rebuild_rows(rb: dict) -> list[tuple[str, ...]]:
    """``counts.rebuild()`` from a wiped state against the hand-written repair."""
    v, out = rb["variants"], []
    for shape, name in (("baseline", "one statement per table"), ("chunked", "chunked")):
        first = shape == "baseline"
        out.append(
            (
                "rebuild",
                f"from a wiped state: counts.rebuild() (A) vs hand-written, {name} (B),"
                " target rows/s"
                + (
                    f" — {rb['target_rows']:,} rows; B/A = engine time ÷ baseline time"
                    if first
                    else ""
                )
                + ("" if rb["exact"] else " (NOT EXACT)"),
                _fmt_rate(v["engine"]["per_second"]),
                _fmt_rate(v[shape]["per_second"]),
                _fmt_x(rb["ratios"][shape]),
                "exact" if first else "",
                _verdict(rb["exact"]) if first else "",
            )
        )
    if "parallel" in v:
        out.append(
            (
                "rebuild",
                f"from a wiped state: counts.rebuild(jobs={rb['jobs']}) (A) vs hand-written,"
                " one statement per table (B), target rows/s",
                _fmt_rate(v["parallel"]["per_second"]),
                _fmt_rate(v["baseline"]["per_second"]),
                _fmt_x(rb["ratios"]["parallel"]),
                "",
                "",
            )
        )
    return out


def _backfill_rows(bf: dict) -> list[tuple[str, ...]]:
    """Adding one count: the engine's backfill against a hand-written one, and a concurrent
    writer's p99 commit latency during each against idle (ratios here are A ÷ B)."""
    engine, hand, idle = bf["engine"], bf["baseline"], bf["idle"]
    exact = "" if bf["exact"] else " (NOT EXACT)"
    return [
        (
            "backfill",
            f"add {bf['count']}: backfill() (A) vs hand-written chunked (B); ratio A ÷ B" + exact,
            f"{engine['seconds']:.2f} s",
            f"{hand['seconds']:.2f} s",
            _fmt_x(bf["ratio"]),
            "exact",
            _verdict(bf["exact"]),
        ),
        _p99_row("(single-row create/delete): during backfill()", engine, idle, bf["p99_ratio"]),
        _p99_row("during the hand-written backfill", hand, idle, bf["p99_ratio_baseline"]),
        *_drained_rows(bf),
    ]


def _p99_row(during: str, sample: dict, idle: dict, x: float) -> tuple[str, ...]:
    """The backfill writer's p99 commit during ``sample`` (A) against ``idle`` (B)."""
    return (
        "backfill",
        f"writer's p99 commit {during} (A) vs idle (B),"
        f" {sample['writes']:,} / {idle['writes']:,} commits; ratio A ÷ B",
        _fmt_ms(sample["p99_ms"]),
        _fmt_ms(idle["p99_ms"]),
        _fmt_x(x),
        "",
        "",
    )


def _drained_rows(bf: dict) -> list[tuple[str, ...]]:
    """The backfill with the workers' drain loop running beside it (absent from older runs)."""
    if "engine_drained" not in bf:
        return []
    drained, idle = bf["engine_drained"], bf["idle_drained"]
    rows = [
        _p99_row(
            "with a drainer running, during backfill()", drained, idle, bf["p99_ratio_drained"]
        )
    ]
    if "baseline_drained" in bf:
        hand = bf["baseline_drained"]
        rows.append(
            _p99_row(
                "with a drainer running, during the hand-written backfill (exact in"
                f" {hand['exact_while_drained']} of {bf['repeats']}: it takes no lock)",
                hand,
                idle,
                bf["p99_ratio_baseline_drained"],
            )
        )
    rows.append(
        (
            "backfill",
            "with a drainer running: oldest waiting mark's age during backfill() (A) vs idle"
            f" (B); {drained['batches_drained']:,} batches drained during the passes",
            f"{drained['oldest_mark_max_s']:.2f} s",
            f"{idle['oldest_mark_max_s']:.2f} s",
            _fmt_x(ratio(drained["oldest_mark_max_s"], idle["oldest_mark_max_s"])),
            "",
            "",
        )
    )
    return rows


def _drainers_rows(dr: dict) -> list[tuple[str, ...]]:
    """Time to empty a backlog on hot targets with 2 and 4 drainers (B) against 1 (A)."""
    one = dr["median_s"]["1"]
    return [
        (
            "drainers",
            f"{dr['writes']:,} single-row writes on the largest set: empty with 1 (A) vs {n} (B)"
            f" drainers, medians of {dr['repeats']}",
            f"{one:.2f} s",
            f"{dr['median_s'][n]:.2f} s",
            _fmt_x(dr["ratio_to_one"][n]),
            "≤ 1.1x, exact",
            _verdict(dr["ratio_to_one"][n] <= 1.1 and dr["exact"]),
        )
        for n in ("2", "4")
    ]


def _incremental_rows(inc: dict) -> list[tuple[str, ...]]:
    """Time to exact counts after each small write (the issue's goals), the threshold change's
    writer and drain, and the drain's cost per changed row."""
    out = []
    cases = inc["cases"]

    def note(case: dict) -> str:
        return "" if case["exact"] else " (NOT EXACT)"

    keys = ("add_members", "bulk_detections", "one_detection", "single_creates")
    for key in (*keys, "one_occurrence", "ten_occurrences"):
        if key not in cases:
            continue
        c = cases[key]
        out.append(
            (
                "incremental",
                f"{c['label']}: drain (A), write (B)" + note(c),
                _fmt_ms(c["drain_ms"]),
                _fmt_ms(c["write_ms"]),
                "",
                f"≤ {c['goal_ms']:g} ms",
                _verdict(c["met"] and c["exact"]),
            )
        )
    if "threshold" in cases:
        c = cases["threshold"]
        out += [
            (
                "incremental",
                f"{c['label']}: writer's UPDATE + commit (A)",
                _fmt_ms(c["write_ms"]),
                "",
                "",
                f"≤ {c['writer_goal_ms']:g} ms",
                _verdict(c["write_ms"] <= c["writer_goal_ms"]),
            ),
            (
                "incremental",
                f"… its drain (A), per flip (B): {c['flips']:,} occurrences scored in"
                f" [{c['from']:g}, {c['to']:g})" + note(c),
                _fmt_ms(c["drain_ms"]),
                _fmt_fine(c["drain_ms_per_row"]),
                "",
                "",
                _verdict(None if c["exact"] else False),
            ),
        ]
    for r in inc["per_row"]:
        c = cases[f"per_row_{r['k']}"]
        out.append(
            (
                "incremental",
                f"{c['label']}: drain (A), per row (B)" + note(c),
                _fmt_ms(c["drain_ms"]),
                _fmt_fine(c["drain_ms_per_row"]),
                "",
                "flat in scale",
                _verdict(None if c["exact"] else False),
            )
        )
    return out


def _exact_rows(ex: dict) -> list[tuple[str, ...]]:
    """The list page read exact against stored, idle and with marks pending."""
    out = []
    for state, goal, label in (
        ("idle", 1.1, "no mark pending"),
        ("pending", 2.0, "1,000 item and 100 delta marks pending"),
    ):
        r = ex[state]
        marks = f" ({r['item_marks']:,} item, {r['delta_marks']:,} delta marks)"
        out.append(
            (
                "exact",
                f"page of 25 (a set of {_size(ex['size'])}), {label}: stored (A) vs exact (B)"
                + (marks if state == "pending" else "")
                + ("" if r["exact"] else " (NOT EXACT)"),
                _fmt_ms(r["stored_ms"]),
                _fmt_ms(r["exact_ms"]),
                _fmt_x(r["ratio"]),
                f"≤ {goal:g}x" + (", exact" if state == "pending" else ""),
                _verdict(r["ratio"] <= goal and r["exact"]),
            )
        )
    return out


_SHAPE_LABELS = {
    "three_level": "three-level (library ← shelf ← book ← review): a review created",
    "filtered_middle": "filtered middle (a book's pages): a book drops below 300 pages",
    "fk_filter": "FK filter (author__isnull, own-row and over an M2M): an author unset",
}


def _shapes_rows(sh: dict) -> list[tuple[str, ...]]:
    """One row per shape and size: A the drain of one write; for the three-level shape, B the
    rest of that write's drain (a count on the same path kept in full, recounted)."""
    out = []
    for case, label in _SHAPE_LABELS.items():
        row = sh["median"][case]
        for n, value in row["ms"].items():
            full = row.get("full_ms", {}).get(n)
            out.append(
                (
                    "shapes",
                    f"{label}, {_size(int(n))} children: drain (A)"
                    + (", the full count's recount (B)" if full is not None else ""),
                    _fmt_ms(value),
                    _fmt_ms(full) if full is not None else "",
                    _fmt_x(full / value if value else None) if full is not None else "",
                    "≤ 5 ms",
                    _verdict(value <= 5),
                )
            )
        out.append(
            (
                "shapes",
                f"… slowest size ÷ fastest ({label.split(' (')[0]})",
                "",
                "",
                _fmt_x(row["spread"]),
                "≤ 1.5x",
                _verdict(row["spread"] <= 1.5),
            )
        )
    return out


#: The table's sections in order: a key of the results and the function making its rows.
_SECTIONS = (
    ("list", _list_rows),
    ("write", _write_rows),
    ("recompute", _recompute_rows),
    ("burst", _burst_rows),
    ("incremental", _incremental_rows),
    ("drainers", _drainers_rows),
    ("reconcile", _reconcile_rows),
    ("rebuild", _rebuild_rows),
    ("backfill", _backfill_rows),
    ("exact", _exact_rows),
    ("shapes", _shapes_rows),
)


HEADER = ("section", "figure (A vs B)", "A", "B", "B/A", "goal", "")


def table(results: dict) -> str:
    """The whole run as one fixed-width table, headed by what it ran on."""
    meta = results["meta"]
    body = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in body) for i in range(len(HEADER))]
    right = {2, 3, 4}

    def line(r):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    ds, pg = meta.get("dataset"), meta["postgres"]
    if ds is None:  # the shapes section alone: the test app's tables, no domain dataset
        sh = results["shapes"]
        return "\n".join(
            [
                f"countdown bench — {meta['cores']} cores, PostgreSQL {pg['version']}"
                f" (jit {pg['jit']}, autovacuum {pg['autovacuum']}), Django {meta['django']},"
                f" Python {meta['python']}",
                f"the engine's test app, targets of {', '.join(_size(n) for n in sh['sizes'])}"
                f" children; medians of {sh['repeats']} repeats; wall {meta['wall_seconds']:.0f} s",
                *_ruled(body, line),
            ]
        )
    seeded = f"seeded, {meta['seed_seconds']:.0f} s" if meta["seeded"] else "reused"
    head = [
        f"countdown bench — {meta['cores']} cores, PostgreSQL {pg['version']} (jit {pg['jit']},"
        f" autovacuum {pg['autovacuum']}), Django {meta['django']}, Python {meta['python']}",
        f"dataset: {ds['captures']:,} captures, {ds['detections']:,} detections,"
        f" {ds['capture_sets']:,} capture sets ({seeded});"
        f" medians of {meta['repeats']} repeats"
        + (
            f" ({results['incremental']['repeats']} for incremental)"
            if results.get("incremental")
            else ""
        )
        + f"; wall {meta['wall_seconds']:.0f} s",
    ]
    return "\n".join([*head, *_ruled(body, line)])


def _ruled(body: list, line) -> list[str]:
    rule = "─" * max(len(line(r)) for r in body)
    return [rule, line(HEADER), rule, *(line(r) for r in body[1:]), rule]


def write_json(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def plot(path: str, results: dict) -> None:
    """List latency (log) against collection size (log), one line per approach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["list"]["sizes"]
    xs = [r["size"] for r in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, name, style in (
        ("cached", "cached columns (production view)", "o-"),
        ("subquery", "3 correlated Subquery(Count) per row", "s--"),
        ("count_distinct", "Count(distinct=True, filter=…)", "^--"),
    ):
        ax.plot(xs, [r[f"{key}_ms"] for r in sizes], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images in the largest capture set on the page")
    ax.set_ylabel("median latency of a page of 25 (ms)")
    meta = results["meta"]
    ax.set_title(
        f"/api/v2/captures/collections/ — {meta['dataset']['captures']:,} captures,"
        f" {meta['cores']} cores",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaling_points(runs: list[dict]) -> dict[int, list[tuple[int, float]]]:
    """``{k: [(captures, drain ms per changed row), ...]}`` over runs, by dataset size."""
    points: dict[int, list[tuple[int, float]]] = {}
    for run in runs:
        captures = run["incremental"]["captures"]
        for r in run["incremental"]["per_row"]:
            points.setdefault(r["k"], []).append((captures, r["drain_ms_per_row"]))
    return {k: sorted(v) for k, v in sorted(points.items())}


def scaling_table(runs: list[dict]) -> str:
    """Drain ms per changed row: one line per run (by dataset size), one column per k."""
    points = _scaling_points(runs)
    sizes = sorted({c for v in points.values() for c, _ in v})
    head = ["captures", *(f"k={k:,}" for k in points)]
    body = [
        [f"{size:,}", *(_fmt_fine(dict(v).get(size)) for v in points.values())] for size in sizes
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "drain ms per changed row (median), by dataset size\n" + "\n".join(lines)


def plot_scaling(path: str, runs: list[dict]) -> None:
    """Drain ms per changed row (log) against captures in the dataset (log), one line per k:
    flat lines mean the drain follows the change, not the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, pts in _scaling_points(runs).items():
        ax.plot([c for c, _ in pts], [y for _, y in pts], "o-", label=f"{k:,} detections per write")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("captures in the dataset")
    ax.set_ylabel("median drain time per changed row (ms)")
    cores = sorted({run["meta"]["cores"] for run in runs})
    ax.set_title(
        f"drain to exact counts after bulk_create on random captures — {len(runs)} run(s),"
        f" {'/'.join(map(str, cores))} cores",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
