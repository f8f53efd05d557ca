//! The HTML report: one self-contained file (inline SVG and CSS, no script, no external
//! URL) with the summary, a timeline (one lane per slot: who held it when, kills and
//! pauses marked), the queue depth over time, each request's wait by its arrival time
//! (a storm's profile shows along the time axis) and a histogram of wait times. Every
//! axis has ticks, and every duration is in the unit a person reads it in (`412µs`,
//! `3.2ms`, `8m24s`). Readable offline in any browser.

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

/// A duration in the unit a person reads it in: `412µs`, `3.2ms`, `870ms`, `12.4s`,
/// `8m24s`, `2h5m`.
pub fn human_ns(ns: u64) -> String {
    let d = std::time::Duration::from_nanos(ns);
    match ns {
        0 => "0".into(),
        1..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.0}µs", ns as f64 / 1e3),
        1_000_000..=9_999_999 => format!("{:.1}ms", ns as f64 / 1e6),
        10_000_000..=999_999_999 => format!("{:.0}ms", ns as f64 / 1e6),
        1_000_000_000..=59_999_999_999 => format!("{:.1}s", ns as f64 / 1e9),
        _ => baton_core::format_duration(d),
    }
}

/// Tick values from 0 up to `max`: about `n` steps of 1, 2 or 5 times a power of
/// ten.
fn ticks(max: f64, n: usize) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0];
    }
    let raw = max / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut out = Vec::new();
    let mut t = 0.0;
    while t <= max + step * 1e-9 {
        out.push(t);
        t += step;
    }
    out
}

/// A chart's frame: `w` × `h` pixels, the plot inside the margins, x from 0 to `xmax`
/// and y from 0 to `ymax` (y grows upwards).
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    xmax: f64,
    ymax: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        self.left
            + (v / self.xmax.max(f64::MIN_POSITIVE)).clamp(0.0, 1.0)
                * (self.w - self.left - self.right)
    }

    fn y(&self, v: f64) -> f64 {
        self.h
            - self.bottom
            - (v / self.ymax.max(f64::MIN_POSITIVE)).clamp(0.0, 1.0)
                * (self.h - self.top - self.bottom)
    }

    /// The opening tag, the axes with their ticks (labelled by `xl` and `yl`) and the
    /// axis titles.
    fn open(
        &self,
        label: &str,
        xtitle: &str,
        ytitle: &str,
        xl: &dyn Fn(f64) -> String,
        yl: Option<&dyn Fn(f64) -> String>,
    ) -> String {
        let mut svg = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" role="img" aria-label="{}">"#,
            self.w,
            self.h,
            esc(label)
        );
        let (x0, x1) = (self.left, self.w - self.right);
        let (y0, y1) = (self.h - self.bottom, self.top);
        let _ = write!(
            svg,
            r#"<line x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}" class="axis"/>"#
        );
        for t in ticks(self.xmax, 8) {
            let x = self.x(t);
            let _ = write!(
                svg,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{y0}" y2="{:.1}" class="axis"/><text x="{x:.1}" y="{:.1}" class="lbl" text-anchor="middle">{}</text>"#,
                y0 + 4.0,
                y0 + 15.0,
                esc(&xl(t))
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" class="lbl" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            self.h - 2.0,
            esc(xtitle)
        );
        if let Some(yl) = yl {
            let _ = write!(
                svg,
                r#"<line x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}" class="axis"/>"#
            );
            for t in ticks(self.ymax, 5) {
                let y = self.y(t);
                let _ = write!(
                    svg,
                    r#"<line x1="{:.1}" x2="{x1}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="lbl" text-anchor="end">{}</text>"#,
                    x0,
                    x0 - 4.0,
                    y + 4.0,
                    esc(&yl(t))
                );
            }
            let _ = write!(
                svg,
                r#"<text x="4" y="{:.1}" class="lbl">{}</text>"#,
                y1 - 6.0,
                esc(ytitle)
            );
        }
        svg
    }
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
    let at = |ns: f64| human_ns(ns as u64);
    let lane_h = if lanes > 16 { 12.0 } else { 28.0 };
    let frame = Frame {
        w: 1000.0,
        h: 20.0 + lanes as f64 * lane_h + 36.0,
        left: 60.0,
        right: 10.0,
        top: 20.0,
        bottom: 36.0,
        xmax: span,
        ymax: 1.0,
    };
    let x = |t: u64| frame.x(t.saturating_sub(t0) as f64);
    let mut svg = frame.open("timeline", "time since the first event", "", &at, None);
    for lane in 0..lanes {
        let y = 20.0 + lane as f64 * lane_h;
        let _ = write!(
            svg,
            r#"<text x="4" y="{:.1}" class="lbl">slot {lane}</text><line x1="{}" x2="{}" y1="{}" y2="{}" class="grid"/>"#,
            y + lane_h * 0.6,
            frame.left,
            frame.w - frame.right,
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
            r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>pid {} token {} slot {}: from {} to {} (held {}, waited {})</title></rect>"#,
            (x1 - x0).max(1.0),
            lane_h - 6.0,
            colour(iv.pid),
            iv.pid,
            iv.token,
            iv.slot,
            human_ns(iv.t_grant_ns - t0),
            human_ns(end - t0),
            human_ns(end.saturating_sub(iv.t_grant_ns)),
            human_ns(iv.t_grant_ns.saturating_sub(iv.t_request_ns))
        );
    }
    let mark_h = lane_h - 4.0;
    let mut paused_at: HashMap<u32, u64> = HashMap::new();
    for e in events {
        match e {
            Event::Killed { pid, t_ns } => {
                let y = 20.0 + f64::from(*slot_of.get(pid).unwrap_or(&0)) * lane_h;
                let cx = x(*t_ns);
                let _ = write!(
                    svg,
                    r#"<g class="kill"><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><title>pid {pid} killed at {}</title></g>"#,
                    cx - 5.0,
                    y + 2.0,
                    cx + 5.0,
                    y + mark_h,
                    cx + 5.0,
                    y + 2.0,
                    cx - 5.0,
                    y + mark_h,
                    human_ns(t_ns - t0)
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
                    r#"<rect class="pause" x="{:.1}" y="{:.1}" width="{:.1}" height="4"><title>pid {pid} {what} from {} to {}</title></rect>"#,
                    x(from),
                    y + lane_h - 6.0,
                    (x(*t_ns) - x(from)).max(1.0),
                    human_ns(from - t0),
                    human_ns(t_ns - t0)
                );
            }
            _ => {}
        }
    }
    svg.push_str("</svg>");

    // Requests: when each arrived, and how long it waited (granted or refused).
    let mut asked: HashMap<u32, u64> = HashMap::new();
    let mut arrivals: Vec<(u64, u64, bool)> = Vec::new();
    let mut depth_steps: Vec<(u64, i64)> = Vec::new();
    for e in events {
        match e {
            Event::Request { pid, t_ns, key: k } if key.as_ref().is_ok_and(|key| key == k) => {
                asked.insert(*pid, *t_ns);
                depth_steps.push((*t_ns, 1));
            }
            Event::Grant { pid, t_ns, .. } | Event::Refused { pid, t_ns, .. } => {
                if let Some(from) = asked.remove(pid) {
                    let granted = matches!(e, Event::Grant { .. });
                    arrivals.push((from - t0, t_ns.saturating_sub(from), granted));
                    depth_steps.push((*t_ns, -1));
                }
            }
            _ => {}
        }
    }
    depth_steps.sort_unstable();
    let waits = depth_chart(&depth_steps, t0, span, &at);
    let scatter = scatter_chart(&arrivals, span, &at);

    // Wait-time histogram: 20 bins from 0 to the longest wait.
    let waits_ns: Vec<u64> = ivs
        .iter()
        .map(|iv| iv.t_grant_ns.saturating_sub(iv.t_request_ns))
        .collect();
    let max = waits_ns.iter().copied().max().unwrap_or(0).max(1);
    let bins = 20usize;
    let mut counts = vec![0u64; bins];
    for &wt in &waits_ns {
        let b = ((wt as f64 / max as f64) * bins as f64) as usize;
        counts[b.min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let hf = Frame {
        w: 640.0,
        h: 240.0,
        left: 50.0,
        right: 10.0,
        top: 20.0,
        bottom: 36.0,
        xmax: max as f64,
        ymax: top as f64,
    };
    let count = |v: f64| format!("{v:.0}");
    let mut hist = hf.open(
        "wait histogram",
        "wait (request to grant)",
        "grants",
        &at,
        Some(&count),
    );
    for (i, &c) in counts.iter().enumerate() {
        let lo = max as f64 * i as f64 / bins as f64;
        let hi = max as f64 * (i + 1) as f64 / bins as f64;
        let (x0, x1) = (hf.x(lo), hf.x(hi));
        let y = hf.y(c as f64);
        let _ = write!(
            hist,
            r#"<rect class="bar" x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}"><title>{}–{}: {c}</title></rect>"#,
            x0 + 1.0,
            (x1 - x0 - 2.0).max(1.0),
            hf.y(0.0) - y,
            human_ns(lo as u64),
            human_ns(hi as u64)
        );
    }
    hist.push_str("</svg>");

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
    let ms = |v: f64| human_ns((v * 1e6).max(0.0) as u64);
    row(
        "wall time",
        human_ns((summary.wall_s * 1e9).max(0.0) as u64),
    );
    row(
        "wait p50 / p99 / max",
        format!(
            "{} / {} / {}",
            ms(summary.wait.p50_ms),
            ms(summary.wait.p99_ms),
            ms(summary.wait.max_ms)
        ),
    );
    row("overhead per handoff", ms(summary.overhead_per_handoff_ms));
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
.lbl{{font:11px sans-serif;fill:#555}}.grid{{stroke:#eee}}.axis{{stroke:#888}}
.depth{{fill:none;stroke:#48c;stroke-width:1.5}}.ok{{fill:#48c;fill-opacity:.6}}.no{{fill:#c00;fill-opacity:.8}}
.kill line{{stroke:#c00;stroke-width:2}}.pause{{fill:#f90}}.bar{{fill:#48c}}
.passed{{color:#080}}.FAILED{{color:#c00}}pre{{margin:0;white-space:pre-wrap}}
</style></head><body>
<h1>baton stress {scenario}: <span class="{verdict}">{verdict}</span></h1>
<table>{rows}</table>
<h2>Timeline</h2><p>One lane per slot; each bar is a holder (hover for pid, token and times); red crosses are kills, orange bands pauses.</p>
{svg}
<h2>Queue depth</h2><p>Requests waiting (asked, not yet granted or refused) over the run.</p>
{waits}
<h2>Wait by arrival</h2><p>Each request at the time it arrived, by how long it waited: blue granted, red refused (timed out, busy or failed). A storm's arrivals follow its profile along the time axis.</p>
{scatter}
<h2>Wait times</h2>
{hist}
<h2>Violations and errors</h2><ul>{problems}</ul>
</body></html>
"#,
        scenario = summary.scenario.name(),
    )
}

/// The number of requests waiting over time: a step line from `steps` (time, +1 for a
/// request, −1 for its answer), sorted by time.
fn depth_chart(steps: &[(u64, i64)], t0: u64, span: f64, at: &dyn Fn(f64) -> String) -> String {
    let mut depth = 0i64;
    let mut top = 1i64;
    let mut points = vec![(0.0, 0i64)];
    for &(t, d) in steps {
        let x = t.saturating_sub(t0) as f64;
        points.push((x, depth));
        depth += d;
        top = top.max(depth);
        points.push((x, depth));
    }
    points.push((span, depth));
    let f = Frame {
        w: 1000.0,
        h: 220.0,
        left: 60.0,
        right: 10.0,
        top: 20.0,
        bottom: 36.0,
        xmax: span,
        ymax: top as f64,
    };
    let count = |v: f64| format!("{v:.0}");
    let mut svg = f.open(
        "queue depth",
        "time since the first event",
        "waiting",
        at,
        Some(&count),
    );
    // A few points per pixel column are enough (a storm has thousands of steps): per
    // column, where the line enters, its peak, and where it leaves.
    let mut line = String::new();
    let mut column: Option<(i64, i64, i64, i64)> = None; // (px, first, peak, last)
    let emit = |line: &mut String, (px, first, peak, last): (i64, i64, i64, i64)| {
        for d in [first, peak, last] {
            let _ = write!(line, "{px},{:.1} ", f.y(d as f64));
        }
    };
    for &(x, d) in &points {
        let px = f.x(x).round() as i64;
        column = match column {
            Some((cpx, first, peak, _)) if cpx == px => Some((cpx, first, peak.max(d), d)),
            Some(done) => {
                emit(&mut line, done);
                Some((px, d, d, d))
            }
            None => Some((px, d, d, d)),
        };
    }
    if let Some(done) = column {
        emit(&mut line, done);
    }
    let _ = write!(
        svg,
        r#"<polyline class="depth" points="{}"><title>at most {top} waiting</title></polyline></svg>"#,
        line.trim_end()
    );
    svg
}

/// Each request as a dot: x its arrival, y its wait; granted blue, refused red.
fn scatter_chart(arrivals: &[(u64, u64, bool)], span: f64, at: &dyn Fn(f64) -> String) -> String {
    let longest = arrivals.iter().map(|a| a.1).max().unwrap_or(1).max(1);
    let f = Frame {
        w: 1000.0,
        h: 260.0,
        left: 60.0,
        right: 10.0,
        top: 20.0,
        bottom: 36.0,
        xmax: span,
        ymax: longest as f64,
    };
    let mut svg = f.open(
        "wait by arrival",
        "arrival (time since the first event)",
        "wait",
        at,
        Some(at),
    );
    for &(arrived, waited, granted) in arrivals {
        let _ = write!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="2" class="{}"><title>arrived at {}, {} after {}</title></circle>"#,
            f.x(arrived as f64),
            f.y(waited as f64),
            if granted { "ok" } else { "no" },
            human_ns(arrived),
            if granted { "granted" } else { "refused" },
            human_ns(waited)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_human_units() {
        assert_eq!(human_ns(750), "750ns");
        assert_eq!(human_ns(412_300), "412µs");
        assert_eq!(human_ns(3_240_000), "3.2ms");
        assert_eq!(human_ns(870_000_000), "870ms");
        assert_eq!(human_ns(12_400_000_000), "12.4s");
        assert_eq!(human_ns(504_468_000_000), "8m24s");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(504_468e6, 8);
        assert!(t.len() >= 5 && t.len() <= 10, "{t:?}");
        assert!(t.last().is_some_and(|l| *l <= 504_468e6));
        assert_eq!(ticks(0.0, 5), vec![0.0]);
        let t = ticks(3.0, 5);
        assert_eq!(t, vec![0.0, 1.0, 2.0, 3.0]);
    }
}
