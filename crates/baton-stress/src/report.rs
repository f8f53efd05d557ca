//! The HTML report: one self-contained file (inline SVG and CSS, no script, no external
//! URL) with the summary, a timeline (one lane per slot: who held it when, kills and
//! pauses marked) and a histogram of wait times. Readable offline in any browser.

use std::collections::HashMap;
use std::fmt::Write;

use crate::history::Event;
use crate::intervals::{intervals_ending, Ends};
use crate::scenario::Summary;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A colour per process, stable within a report.
fn colour(pid: u32) -> String {
    let h = (pid.wrapping_mul(2_654_435_761)) % 360;
    format!("hsl({h},60%,55%)")
}

/// Renders the report for a run.
pub fn html(summary: &Summary, events: &[Event]) -> String {
    let key = baton_core::Key::new(summary.key.clone());
    let ivs = match &key {
        Ok(k) => intervals_ending(events, k, Ends::Release),
        Err(_) => Vec::new(),
    };
    let t0 = events.iter().map(Event::t_ns).min().unwrap_or(0);
    let t1 = events
        .iter()
        .map(Event::t_ns)
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let span = (t1 - t0) as f64;
    let lanes = ivs
        .iter()
        .map(|iv| iv.slot + 1)
        .max()
        .unwrap_or(1)
        .max(summary.slots);
    let (w, lane_h, left) = (1000.0, 28.0, 60.0);
    let x = |t: u64| left + (t.saturating_sub(t0) as f64 / span) * (w - left - 10.0);
    let height = 30.0 + lanes as f64 * lane_h + 20.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" role="img" aria-label="timeline">"#
    );
    for lane in 0..lanes {
        let y = 20.0 + lane as f64 * lane_h;
        let _ = write!(
            svg,
            r#"<text x="4" y="{}" class="lbl">slot {lane}</text><line x1="{left}" x2="{}" y1="{}" y2="{}" class="grid"/>"#,
            y + 17.0,
            w - 10.0,
            y + lane_h,
            y + lane_h
        );
    }
    let mut slot_of: HashMap<u32, u32> = HashMap::new();
    for iv in &ivs {
        slot_of.insert(iv.pid, iv.slot);
        let y = 20.0 + iv.slot as f64 * lane_h + 3.0;
        let end = iv.t_release_ns.unwrap_or(t1);
        let (x0, x1) = (x(iv.t_grant_ns), x(end));
        let _ = write!(
            svg,
            r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>pid {} token {} slot {}: {:.3}–{:.3} ms</title></rect>"#,
            (x1 - x0).max(1.0),
            lane_h - 6.0,
            colour(iv.pid),
            iv.pid,
            iv.token,
            iv.slot,
            (iv.t_grant_ns - t0) as f64 / 1e6,
            (end - t0) as f64 / 1e6
        );
    }
    let mut paused_at: HashMap<u32, u64> = HashMap::new();
    for e in events {
        match e {
            Event::Killed { pid, t_ns } => {
                let y = 20.0 + f64::from(*slot_of.get(pid).unwrap_or(&0)) * lane_h;
                let cx = x(*t_ns);
                let _ = write!(
                    svg,
                    r#"<g class="kill"><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><title>pid {pid} killed at {:.3} ms</title></g>"#,
                    cx - 5.0,
                    y + 4.0,
                    cx + 5.0,
                    y + 24.0,
                    cx + 5.0,
                    y + 4.0,
                    cx - 5.0,
                    y + 24.0,
                    (t_ns - t0) as f64 / 1e6
                );
            }
            Event::Paused { pid, t_ns } | Event::Partitioned { pid, t_ns } => {
                paused_at.insert(*pid, *t_ns);
            }
            Event::Resumed { pid, t_ns } | Event::Healed { pid, t_ns } => {
                let from = paused_at.remove(pid).unwrap_or(*t_ns);
                let what = match e {
                    Event::Healed { .. } => "cut off",
                    _ => "paused",
                };
                let y = 20.0 + f64::from(*slot_of.get(pid).unwrap_or(&0)) * lane_h;
                let _ = write!(
                    svg,
                    r#"<rect class="pause" x="{:.1}" y="{:.1}" width="{:.1}" height="6"><title>pid {pid} {what} {:.3}–{:.3} ms</title></rect>"#,
                    x(from),
                    y + lane_h - 8.0,
                    (x(*t_ns) - x(from)).max(1.0),
                    (from - t0) as f64 / 1e6,
                    (t_ns - t0) as f64 / 1e6
                );
            }
            _ => {}
        }
    }
    let _ = write!(
        svg,
        r#"<text x="{left}" y="{:.1}" class="lbl">0 ms</text><text x="{:.1}" y="{:.1}" class="lbl" text-anchor="end">{:.1} ms</text></svg>"#,
        height - 4.0,
        w - 10.0,
        height - 4.0,
        span / 1e6
    );

    // Wait-time histogram: 20 bins from 0 to the longest wait.
    let waits: Vec<u64> = ivs
        .iter()
        .map(|iv| iv.t_grant_ns.saturating_sub(iv.t_request_ns))
        .collect();
    let max = waits.iter().copied().max().unwrap_or(0).max(1);
    let bins = 20usize;
    let mut counts = vec![0u64; bins];
    for &wt in &waits {
        let b = ((wt as f64 / max as f64) * bins as f64) as usize;
        counts[b.min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let (hw, hh) = (600.0, 200.0);
    let bw = (hw - 40.0) / bins as f64;
    let mut hist = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{hw}" height="{}" role="img" aria-label="wait histogram">"#,
        hh + 30.0
    );
    for (i, &c) in counts.iter().enumerate() {
        let bh = (c as f64 / top as f64) * hh;
        let lo = max as f64 * i as f64 / bins as f64 / 1e6;
        let hi = max as f64 * (i + 1) as f64 / bins as f64 / 1e6;
        let _ = write!(
            hist,
            r#"<rect class="bar" x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}"><title>{lo:.1}–{hi:.1} ms: {c}</title></rect>"#,
            30.0 + i as f64 * bw,
            hh - bh + 5.0,
            bw - 2.0
        );
    }
    let _ = write!(
        hist,
        r#"<text x="30" y="{:.1}" class="lbl">0</text><text x="{:.1}" y="{:.1}" class="lbl" text-anchor="end">{:.1} ms</text><text x="2" y="15" class="lbl">{top}</text></svg>"#,
        hh + 22.0,
        hw - 10.0,
        hh + 22.0,
        max as f64 / 1e6
    );

    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        let _ = write!(rows, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    };
    row("scenario", summary.scenario.name().into());
    row("store", summary.store.clone());
    row(
        "key / slots",
        format!("{} / {}", summary.key, summary.slots),
    );
    row(
        "events / grants",
        format!("{} / {}", summary.events, summary.grants),
    );
    row(
        "throughput",
        format!("{:.1} grants/s", summary.throughput_per_s),
    );
    row(
        "wait p50 / p99 / max",
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            summary.wait.p50_ms, summary.wait.p99_ms, summary.wait.max_ms
        ),
    );
    row(
        "overhead per handoff",
        format!("{:.2} ms", summary.overhead_per_handoff_ms),
    );
    row("fairness (Jain)", format!("{:.3}", summary.fairness));
    row(
        "killed / paused / fenced writes",
        format!(
            "{} / {} / {}",
            summary.killed, summary.paused, summary.fenced_writes
        ),
    );
    row("violations", summary.violation_count.to_string());
    row("replay", summary.replay.clone());
    let mut problems = String::new();
    for v in &summary.violations {
        let _ = write!(problems, "<li><pre>{}</pre></li>", esc(&v.to_string()));
    }
    for e in &summary.errors {
        let _ = write!(problems, "<li><pre>error: {}</pre></li>", esc(e));
    }
    let verdict = if summary.passed() { "passed" } else { "FAILED" };
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>baton stress {scenario}: {verdict}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:2px 12px 2px 0;vertical-align:top}}
.lbl{{font:11px sans-serif;fill:#555}}.grid{{stroke:#ddd}}
.kill line{{stroke:#c00;stroke-width:2}}.pause{{fill:#f90}}.bar{{fill:#48c}}
.passed{{color:#080}}.FAILED{{color:#c00}}pre{{margin:0;white-space:pre-wrap}}
</style></head><body>
<h1>baton stress {scenario}: <span class="{verdict}">{verdict}</span></h1>
<table>{rows}</table>
<h2>Timeline</h2><p>One lane per slot; each bar is a holder (hover for pid and token); red crosses are kills, orange bands pauses.</p>
{svg}
<h2>Wait times</h2>
{hist}
<h2>Violations and errors</h2><ul>{problems}</ul>
</body></html>
"#,
        scenario = summary.scenario.name(),
    )
}
