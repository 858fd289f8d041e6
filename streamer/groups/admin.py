"""Operations sub-commands (registered into ``kg-streamer`` by ``streamer.cli``):

    kg-streamer status [--group G ...] [--topics T ...] [--json]
        per group and partition: committed offset, end offset, lag in messages and seconds,
        last commit age (and the group's state and members); exit 0
    kg-streamer replay --group G --to earliest|latest|<offset>|<ISO time>|=-<N>[smhd]
                       [--topics T ...] [--dry-run] [--force] [--follow [--timeout S]]
        rewind the group to backfill; refused (exit 3) while it has live members, or for the
        embedding worker's group (it resumes from its own checkpoint), unless --force;
        --follow shows the backfill's progress (rate, ETA) until the group has caught up
    kg-streamer lag-exporter [--group G ...] [--interval S]
        serve the lag gauges of the groups on KGS_METRICS_ADDR, also while their consumers
        are down (a consumer only reports its own group while it runs)

Lag is read from the broker; see ``streamer/groups/lag.py`` for how, and docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime

from kafka.errors import KafkaError

from streamer.health import HEALTH
from streamer.settings import Settings

EXIT_REFUSED = 3
LOG_EVERY_S = 5.0
RATE_WINDOW_S = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="lag per group and partition: messages, seconds, last commit age")
    p.add_argument("--group", action="append", default=None, help="consumer group (repeatable; default: the pipeline's)")
    p.add_argument("--topics", nargs="+", default=None, help="topics to report (default: the group's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("replay", help="rewind a consumer group (backfill); refuses while it has live members")
    p.add_argument("--group", required=True)
    p.add_argument(
        "--to",
        required=True,
        help="earliest | latest | <offset> | <ISO-8601 time, UTC if no zone> | -<N>[smhd] relative (write --to=-15m)",
    )
    p.add_argument("--topics", nargs="+", default=None, help="default: the topics the group committed on")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove the group's live members first (meant for members that are gone but not evicted); "
        "also allows rewinding the embedding worker's group",
    )
    p.add_argument("--follow", action="store_true", help="then show the backfill's progress until caught up")
    p.add_argument("--timeout", type=float, default=None, help="stop following after S seconds")
    p.add_argument("--json", action="store_true", help="print the plan and summary as JSON")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("lag-exporter", help="serve consumer-lag metrics for groups (also while their consumers are down)")
    p.add_argument("--group", action="append", default=None, help="consumer group (repeatable; default: the pipeline's)")
    p.add_argument("--interval", type=float, default=None, help="seconds between samples (default 5)")
    p.add_argument("--max-seconds", type=float, default=None)
    p.set_defaults(func=cmd_lag_exporter)


def _quiet_kafka() -> None:
    """kafka-python logs every connection at INFO: noise in a one-shot command's output."""
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _groups(settings: Settings, sampler, names: list[str] | None, topics: list[str] | None = None) -> dict[str, list[str] | None]:
    """The named groups (default: the pipeline's, sharded workers' groups found on the broker)."""
    from streamer.groups.lag import pipeline_groups

    known = pipeline_groups(settings, sampler.list_groups())
    names = names or list(known)
    return {g: topics or known.get(g) for g in names}


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _fmt_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


# --- status -----------------------------------------------------------------------------------
def cmd_status(args, settings: Settings) -> int:
    from streamer.groups.lag import LagSampler

    _quiet_kafka()
    sampler = LagSampler(settings.bootstrap_servers)
    try:
        sample = sampler.sample(_groups(settings, sampler, args.group, args.topics))
    except KafkaError as exc:
        print(f"cannot read lag from {settings.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    finally:
        sampler.close()
    if args.json:
        print(json.dumps({"groups": [g.to_dict() for g in sample]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for g in sample:
        members = len(g.members)
        table = Table(
            title=f"[bold]{g.group}[/]  state {g.state or '?'}, {members} member{'s' if members != 1 else ''}, "
            f"sampled {_fmt_ts(g.sampled_at)}",
            title_justify="left",
        )
        for name in ("topic", "partition", "committed", "end", "lag (msgs)", "lag (s)", "last commit"):
            table.add_column(name, justify="left" if name == "topic" else "right")
        for p in g.partitions:
            lag_s = p.lag_seconds()
            style = "red" if p.lag_messages and (lag_s or 0) > 60 else ("yellow" if p.lag_messages else None)
            table.add_row(
                p.topic,
                str(p.partition),
                "-" if p.committed is None else str(p.committed),
                str(p.end),
                f"{p.lag_messages:,}",
                _fmt_age(lag_s),
                _fmt_age(p.commit_age()),
                style=style,
            )
        table.add_section()
        table.add_row("total", "", "", "", f"{g.lag_messages:,}", _fmt_age(g.lag_seconds), "", style="bold")
        if not g.partitions:
            table.caption = "no committed offsets and no known topics for this group"
        console.print(table)
    if any(p.commit_ts is None and p.committed is not None for g in sample for p in g.partitions):
        console.print("[dim]last commit '?': the broker did not keep the commit metadata (Tansu drops it)[/]")
    return 0


# --- replay -----------------------------------------------------------------------------------
def cmd_replay(args, settings: Settings) -> int:
    from rich.console import Console
    from rich.markup import escape

    from streamer.groups.lag import LagSampler
    from streamer.groups.rewind import parse_target

    _quiet_kafka()
    out = Console()
    err = Console(stderr=True)
    try:
        target = parse_target(args.to)
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        return 2
    sampler = LagSampler(settings.bootstrap_servers)
    try:
        return _replay(args, settings, sampler, target, out, err)
    except KafkaError as exc:
        err.print(f"[red]cannot replay {args.group} on {settings.bootstrap_servers}:[/] {escape(str(exc))}")
        return 1
    finally:
        sampler.close()


def _replay(args, settings: Settings, sampler, target, out, err) -> int:
    from rich.markup import escape
    from rich.table import Table

    from streamer.groups.lag import pipeline_groups
    from streamer.groups.rewind import ReplayRefused, apply_replay, plan_replay, replay_topics

    topics = replay_topics(sampler, args.group, args.topics, pipeline_groups(settings, sampler.list_groups()))
    if not topics:
        err.print(f"[red]group {args.group} has no committed offsets: name the topics with --topics[/]")
        return 2
    plans = plan_replay(sampler, args.group, topics, target)
    state, members = sampler.describe(args.group)
    summary = {
        "group": args.group,
        "to": target.describe(),
        "dry_run": args.dry_run,
        "state": state,
        "members": len(members),
        "to_reread": sum(p.to_reread for p in plans),
        "backfill": sum(p.backfill for p in plans),
        "partitions": [p.to_dict() for p in plans],
    }
    if not args.json:
        table = Table(
            title=f"replay {args.group} to {target.describe()}{'  (dry run)' if args.dry_run else ''}", title_justify="left"
        )
        for name in ("topic", "partition", "committed", "new offset", "re-read", "to log end"):
            table.add_column(name, justify="left" if name == "topic" else "right")
        for p in plans:
            table.add_row(
                p.topic,
                str(p.partition),
                "-" if p.current is None else str(p.current),
                str(p.target),
                f"{p.to_reread:,}",
                f"{p.backfill:,}",
            )
        table.add_section()
        table.add_row("total", "", "", "", f"{summary['to_reread']:,}", f"{summary['backfill']:,}", style="bold")
        out.print(table)
    embed_note = (
        f"{args.group} is the embedding worker's group: the worker resumes kg.changes from its own "
        "checkpoint, so a rewind only moves the offsets it reports (lag looks high until its next commit). "
        "To rebuild its state, stop it and remove <state_dir>/embed; --force rewinds anyway"
    )
    if args.group == settings.embed_group and (args.dry_run or args.force):
        err.print(f"[yellow]note: {embed_note}[/]")
    elif args.group == settings.embed_group:
        err.print(f"[red]refused:[/] {embed_note}")
        if args.json:
            print(json.dumps({**summary, "refused": embed_note}, indent=2))
        return EXIT_REFUSED
    if args.dry_run:
        if members:
            err.print(f"[yellow]the group has {len(members)} live member(s): a real run is refused without --force[/]")
        if args.json:
            print(json.dumps(summary, indent=2))
        return 0
    try:
        removed = apply_replay(sampler, args.group, plans, force=args.force)
    except ReplayRefused as exc:
        err.print(f"[red]refused:[/] {escape(str(exc))}")
        if args.json:
            print(json.dumps({**summary, "refused": str(exc)}, indent=2))
        return EXIT_REFUSED
    summary["removed_members"] = len(removed)
    if not args.json:
        err.print(
            f"[green]committed[/] {len(plans)} partition offsets for {args.group}"
            + (f" (removed {len(removed)} member(s))" if removed else "")
        )
    if args.follow:
        summary["backfill_run"] = _follow(sampler, args.group, plans, args.timeout, err)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def _follow(sampler, group: str, plans, timeout_s: float | None, console) -> dict:
    """A progress bar with rate and ETA while the group's consumers re-read the backfill."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from streamer.groups.rewind import follow_backfill

    total = sum(p.backfill for p in plans)
    columns = (
        TextColumn("[bold]backfill {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("eta {task.fields[eta]}"),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
    )
    window: list[tuple[float, int]] = []  # (time, done) over the last RATE_WINDOW_S
    last_line = [0.0, -1]  # (time, done) of the last printed line

    def on_progress(done: int, _total: int) -> None:
        now = time.monotonic()
        window.append((now, done))
        while len(window) > 2 and now - window[1][0] >= RATE_WINDOW_S:
            window.pop(0)
        # rate over the window, from the last sample before progress resumed: time spent waiting for
        # the consumers to start is not counted as slowness
        d0 = window[0][1]
        t_start, d_start = window[max(i for i, (_t, d) in enumerate(window) if d == d0)]
        rate = (done - d_start) / (now - t_start) if done > d_start and now > t_start else 0.0
        eta = "0:00:00" if done >= total else (_fmt_duration((total - done) / rate) if rate > 0 else "?")
        rate_text = f"{rate:,.0f} msg/s" if rate > 0 else "? msg/s"
        progress.update(task, completed=done, rate=rate_text, eta=eta)
        moved = done != last_line[1]
        if not console.is_terminal and (now - last_line[0] >= (1.0 if moved else LOG_EVERY_S) or done >= total):
            # no live bar without a terminal (CI, `docker compose run -T`): a line when the group
            # progressed (at most one a second), else one every LOG_EVERY_S
            last_line[:] = [now, done]
            console.print(
                f"backfill {group}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%) {rate_text} eta {eta}", highlight=False
            )

    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(group, total=total, rate="? msg/s", eta="?")
        result = follow_backfill(sampler, group, plans, timeout_s=timeout_s, on_progress=on_progress)
    console.print(
        f"{'caught up' if result['caught_up'] else 'stopped following'}: {result['done_messages']:,} of "
        f"{result['backfill_messages']:,} messages in {result['seconds']}s "
        f"({result['messages_per_s'] or 0:,} msg/s)"
    )
    return result


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- lag exporter -----------------------------------------------------------------------------
def cmd_lag_exporter(args, settings: Settings) -> int:
    from streamer import metrics
    from streamer.groups.lag import DEFAULT_INTERVAL_S, LagMonitor

    try:
        served = metrics.serve(settings.metrics_addr)
    except metrics.AddressInUse as e:
        print(f"kg-streamer lag-exporter: {e}", file=sys.stderr)
        return 2
    if not served:
        print("lag-exporter needs KGS_METRICS_ADDR (host:port)", file=sys.stderr)
        return 2
    from streamer.groups.lag import LagSampler

    sampler = LagSampler(settings.bootstrap_servers)
    try:
        groups = _groups(settings, sampler, args.group)
    finally:
        sampler.close()
    monitor = LagMonitor(
        settings.bootstrap_servers,
        groups,
        interval_s=args.interval or DEFAULT_INTERVAL_S,
        discover=None if args.group else settings,
    ).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(json.dumps({"serving": settings.metrics_addr, "groups": list(groups)}), flush=True)
    # /healthz: live while samples keep coming; ready from the first one (streamer/health.py)
    HEALTH.stale_s = max(60.0, 10 * monitor.interval_s)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    seen = None
    while not done.wait(1.0) and not (deadline and time.monotonic() >= deadline):
        if monitor.sampled_at != seen:  # a new sample: live, and ready
            seen = monitor.sampled_at
            HEALTH.set_phase("member")
    HEALTH.set_phase("stopping")
    monitor.stop()
    return 0
