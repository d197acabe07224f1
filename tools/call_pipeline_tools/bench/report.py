"""The benchmark's report: the figures (also written as JSON) and what they are printed as."""

from __future__ import annotations

from collections import Counter

from call_pipeline_tools.bench.measuring import ManyFigures, RunFigures, bound_seconds


def total_outcome(outcomes: dict[int, dict]) -> dict:
    total = {key: sum(o[key] for o in outcomes.values()) for key in ("matched", "with_follow_up", "recordings")}
    total["follow_up_rows"] = max(o["follow_up_rows"] for o in outcomes.values())  # the whole table's
    total["tasks_at_4"] = sum(o["task_type"] == 4 for o in outcomes.values())
    total["task_type"] = min(o["task_type"] for o in outcomes.values())
    return total


def report(args, figures: dict, runs: list[RunFigures], outcome: dict, stats: dict, needed: dict,
           statements: Counter | None, qps_cap: int | None, many: ManyFigures | None = None) -> None:
    """Adds the figures to `figures` (written as JSON by the caller) and prints them."""
    wall = many.wall if many is not None else sum(run.wall for run in runs)
    if wall <= 0:  # a benchmark that stalled before any task reached 4
        wall = float("nan")
    leads = args.leads * (many.tasks if many is not None else 1)
    _add_figures(figures, runs, outcome, stats, needed, wall, many)
    print()
    _print_outcome(args, figures, runs, outcome, wall, many)
    _print_bound(args, figures, stats, wall, leads, qps_cap, many)
    _print_calls(figures, stats, needed, statements, wall)
    _print_steps(args, figures, runs, wall)
    _print_memory_and_cpu(figures, stats, leads, many)


def _add_figures(figures: dict, runs: list[RunFigures], outcome: dict, stats: dict, needed: dict, wall: float,
                 many: ManyFigures | None) -> None:
    kinds: Counter = Counter()
    for run in runs:
        kinds.update(run.step_kinds)
    mib = 1024 * 1024
    figures.update({
        "runs": len(runs), "wall_s": round(wall, 2), "outcome": outcome,
        "calls": dict(sorted(stats["requests"].items())),
        "llm_calls": stats["dashscope_requests"], "outboundbot_calls": stats["outboundbot_requests"],
        "llm_calls_needed": needed["llm"], "download_calls_needed": needed["recordings"],
        "llm_repeated": max(0, stats["dashscope_requests"] - needed["llm"]),
        "downloads_repeated": stats["download_recording_repeats"],
        "throttled": stats["throttled"], "max_outboundbot_requests_in_any_1s": stats["max_requests_in_any_1s"],
        "max_llm_in_flight": stats["max_llm_in_flight"],
        "steps": sum(run.steps for run in runs), "step_seconds": round(sum(run.step_seconds for run in runs), 2),
        "step_kinds": dict(kinds),
        "first_step_s": round(runs[0].first_step_s, 2) if runs else None,
        "process_exit_s": round(runs[-1].process_exit_s, 2) if runs and runs[-1].process_exit_s else None,
        "simulator_peak_rss_mib": round(stats["peak_rss_mib"], 1),
    })
    if many is None:
        figures.update({
            "peak_pss_mib": round(max(r.peak_pss for r in runs) / mib, 1),
            "peak_rss_sum_mib": round(max(r.peak_rss for r in runs) / mib, 1),
            "peak_processes": max(r.peak_processes for r in runs),
            "cpu_s": round(sum(r.cpu_s or 0.0 for r in runs), 1),
        })
    else:
        figures.update({
            "peak_pss_mib": round(many.peak_pss / mib, 1), "peak_rss_sum_mib": round(many.peak_rss / mib, 1),
            "peak_processes": many.peak_processes, "wall_from_daemon_start_s": round(many.all_done, 2),
            "first_run_queued_s": round(many.first_queued, 2), "first_run_launched_s": round(many.first_launched, 2),
            "last_run_ended_s": round(many.last_run_ended, 2), "left_behind": many.left_behind,
            "run_table": [{"task": r.task_id, "run_id": r.run_id, "status": r.status, "retry_of": r.parent_run_id,
                           "queued_s": None if r.queued_at is None else round(r.queued_at, 2),
                           "launched_s": round(r.launched_at or 0.0, 2), "ended_s": round(r.ended_at or 0.0, 2),
                           "wall_s": round(r.wall, 2), "first_step_s": round(r.first_step_s, 2), "steps": r.steps,
                           "task_at_4_s": round(many.done_at[r.task_id], 2) if r.task_id in many.done_at else None}
                          for r in runs],
        })


def _print_outcome(args, figures: dict, runs: list[RunFigures], outcome: dict, wall: float,
                   many: ManyFigures | None) -> None:
    if many is None:
        print(f"leads: {args.leads:,}; runs: {len(runs)}; task_type {outcome['task_type']}; "
              f"matched {outcome['matched']:,}; follow-ups {outcome['with_follow_up']:,}; "
              f"recordings {outcome['recordings']:,}")
        exited = runs[-1].process_exit_s if runs else None
        print(f"wall time: {wall:.1f} s, from the launch to the run's end (first step at {figures['first_step_s']} s"
              + (f"; the run's process exited at {exited:.1f} s)" if exited is not None else ")"))
        return
    _print_run_table(many)
    relaunched = len(runs) - len({r.task_id for r in runs})
    leads = args.leads * many.tasks
    print(f"tasks: {many.tasks} x {args.leads:,} leads = {leads:,}; runs: {len(runs)} ({relaunched} more than "
          f"one per task); tasks at 4: {outcome['tasks_at_4']}/{many.tasks}; matched {outcome['matched']:,}; "
          f"follow-ups {outcome['with_follow_up']:,}; recordings {outcome['recordings']:,}")
    print(f"timing (s from the daemon's start): first run queued {many.first_queued:.1f}, first launched "
          f"{many.first_launched:.1f}, last launched {max((r.launched_at or 0.0 for r in runs), default=0.0):.1f}; "
          f"every task "
          f"at 4 at {many.all_done:.1f}; last run ended {many.last_run_ended:.1f}")
    if many.stalled:
        figures["stalled"] = many.stalled
        print(f"STALLED: {many.stalled}. The figures below count what was done until then; the wall "
              "time runs until the last task that reached 4.")
    print(f"wall time: {wall:.1f} s, from the first run's launch until every task was at 4 "
          f"({many.all_done:.1f} s from the daemon's start)")


def _print_bound(args, figures: dict, stats: dict, wall: float, leads: int, qps_cap: int | None,
                 many: ManyFigures | None) -> None:
    """The cloud's bound T and wall ÷ T; at zero latency (no cap), leads per second."""
    if qps_cap is None:
        figures["leads_per_s"] = round(leads / wall, 1)
        print(f"throughput: {leads / wall:,.0f} leads/s")
        return
    ob_bound, llm_bound = bound_seconds(stats, qps_cap, args.llm_latency_ms / 1000, args.llm_concurrency)
    bound = max(ob_bound, llm_bound)
    figures.update({"bound_s": round(bound, 2), "ratio": round(wall / bound, 3) if bound else None})
    if many is not None and bound:
        figures["ratio_from_daemon_start"] = round(many.all_done / bound, 3)
    print(("bound T (all tasks together: the account's limits are shared) = " if many is not None else
           "bound T = ")
          + f"max({stats['outboundbot_requests']:,} OutboundBot calls / {qps_cap} per s = "
          f"{ob_bound:.1f} s, {stats['dashscope_requests']:,} LLM calls x {args.llm_latency_ms / 1000:g} s / "
          f"{args.llm_concurrency} = {llm_bound:.1f} s) = {bound:.1f} s")
    if many is None:
        print(f"wall / T = {wall / bound:.3f}" if bound else "wall / T: no calls")
    else:
        print(f"wall / T = {wall / bound:.3f} (from the daemon's start: {many.all_done / bound:.3f})"
              if bound else "wall / T: no calls")


def _print_calls(figures: dict, stats: dict, needed: dict, statements: Counter | None, wall: float) -> None:
    calls = figures["calls"]
    print("calls per API action: " + ", ".join(f"{k} {v:,}" for k, v in calls.items())
          + f"; DashScope {stats['dashscope_requests']:,}; throttled {stats['throttled']:,}; "
          f"max OutboundBot requests in any 1 s {stats['max_requests_in_any_1s']}; "
          f"max LLM calls in flight {stats['max_llm_in_flight']}")
    print(f"calls against the work: LLM {stats['dashscope_requests']:,} for {needed['llm']:,} leads with a "
          f"transcript ({figures['llm_repeated']:,} repeated); DownloadRecording "
          f"{calls.get('DownloadRecording', 0):,} for "
          f"{needed['recordings']:,} succeeded leads ({figures['downloads_repeated']:,} repeated)")
    if "archived" in figures:
        archived = figures["archived"]
        print(f"archive: {archived['recordings']:,} recordings, {archived['bytes'] / 1e6:.1f} MB; "
              f"{archived['recordings'] / wall:.1f} recordings/s, {archived['bytes'] / wall / 1e6:.2f} MB/s "
              f"over the run's wall time")
    if statements is not None:
        figures["db_statements"] = dict(statements)
        print("database statements (MariaDB server counters"
              + ("; the Dagster instance's included" if figures.get("instance") == "mysql" else "") + "): "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(statements.items())))


def _print_steps(args, figures: dict, runs: list[RunFigures], wall: float) -> None:
    steps, step_seconds = figures["steps"], figures["step_seconds"]
    overhead = (wall - step_seconds) / steps if steps else 0.0
    print(f"dagster: {steps:,} steps ({', '.join(f'{k} {v}' for k, v in sorted(figures['step_kinds'].items()))}); "
          f"step time {step_seconds:.1f} s, summed")
    figures["step_overhead_ms"] = round(overhead * 1000, 1)
    if args.timeline:
        for run in runs:
            print(f"timeline of run {run.run_id[:8]} (seconds from the launch):")
            for at, kind, step in run.timeline:
                print(f"  {at:7.2f}  {kind:<20} {step}")


def _print_memory_and_cpu(figures: dict, stats: dict, leads: int, many: ManyFigures | None) -> None:
    if many is None:
        print(f"peak memory of the run's processes ({figures['peak_processes']} at most): "
              f"{figures['peak_pss_mib']:.0f} MiB (PSS, shared pages once), {figures['peak_rss_sum_mib']:.0f} MiB "
              f"(RSS summed); simulator process {stats['peak_rss_mib']:.0f} MiB")
        if figures.get("executor") == "celery":
            print(f"CPU of the run's own process (user + system; the Celery workers' is not counted): "
                  f"{figures['cpu_s']:.1f} s")
        else:
            print(f"CPU of the run's processes (user + system, every step process included): {figures['cpu_s']:.1f} s"
                  + (f", {figures['cpu_s'] * 1000 / leads:.2f} ms a lead" if leads else ""))
        return
    workers = ", the Celery workers" if figures.get("executor") == "celery" else ""
    print(f"peak memory of the whole process tree (the daemon, its code server, the runs and their step "
          f"processes{workers}; {figures['peak_processes']} processes at most): "
          f"{figures['peak_pss_mib']:.0f} MiB (PSS, shared pages once), {figures['peak_rss_sum_mib']:.0f} MiB "
          f"(RSS summed); simulator process {stats['peak_rss_mib']:.0f} MiB")
    print("processes left behind after the daemon and the workers stopped: "
          + ("; ".join(many.left_behind) + " (killed)" if many.left_behind else "none"))


def _print_run_table(many: ManyFigures) -> None:
    print("runs (seconds from the daemon's start; 1st step: from the run's launch; wall: from the launch to "
          "the run's end; at 4: when the bench saw the task at 4):")
    print(f"  {'task':>6}  {'run':<8}  {'queued':>7}  {'launched':>8}  {'1st step':>8}  {'ended':>7}  "
          f"{'wall':>6}  {'steps':>5}  {'at 4':>7}  status")
    for run in many.runs:
        at_4 = many.done_at.get(run.task_id)
        queued = "-" if run.queued_at is None else f"{run.queued_at:.1f}"
        extra = f" (retry of {run.parent_run_id[:8]})" if run.parent_run_id else ""
        extra += f"; failed steps: {', '.join(run.failed_steps[:3])}" if run.failed_steps else ""
        print(f"  {run.task_id:>6}  {run.run_id[:8]:<8}  {queued:>7}  {run.launched_at or 0.0:>8.1f}  "
              f"{run.first_step_s:>8.1f}  {run.ended_at or 0.0:>7.1f}  {run.wall:>6.1f}  {run.steps:>5}  "
              f"{'-' if at_4 is None else f'{at_4:.1f}':>7}  {run.status}{extra}")
