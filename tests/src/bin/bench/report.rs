//! The report of a run, written from [`Results`] alone: `results.json` (everything,
//! every sample), `summary.md` (tables of medians, spreads and ratios) and
//! `report.html` (self-contained: inline SVG plots drawn here, no script, nothing
//! fetched). Every figure carries the machine, kernel and commit it was measured on.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

use crate::results::{Better, Ratio, Record, Results};

pub fn write(results: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    std::fs::write(dir.join("summary.md"), summary(results))?;
    std::fs::write(dir.join("report.html"), html(results))?;
    Ok(())
}

fn provenance(results: &Results) -> String {
    let e = &results.environment;
    format!(
        "{} ({} CPUs), kernel {}, commit {}, {} mode, generator {}, {}",
        e.machine, e.cpus, e.kernel, e.commit, e.mode, e.generator, e.started
    )
}

fn number(value: f64) -> String {
    let a = value.abs();
    if a >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if a >= 100.0 {
        format!("{value:.0}")
    } else if a >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A count as a tick: 1, 100, 10k, 1M.
fn count(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{}k", value / 1e3)
    } else {
        format!("{value}")
    }
}

fn case_label(r: &Record) -> String {
    match &r.variant {
        Some(v) => format!("{}, {v}", r.case),
        None => r.case.clone(),
    }
}

/// Systems in the order first seen, ours first.
fn systems(records: &[&Record]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for r in records {
        if !out.contains(&r.system) {
            out.push(r.system.clone());
        }
    }
    out.sort_by_key(|s| (s != "ours", s == "floor"));
    out
}

/// (metric, unit) in the order first seen.
fn metrics(records: &[&Record]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![];
    for r in records {
        let m = (r.metric.clone(), r.unit.clone());
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// Case labels in the order first seen, for one metric.
fn cases(records: &[&Record], metric: &str) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for r in records.iter().filter(|r| r.metric == metric) {
        let c = case_label(r);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

fn ratios_of<'a>(results: &'a Results, part: &str, scenario: &str) -> Vec<&'a Ratio> {
    results
        .ratios
        .iter()
        .filter(|r| r.part == part && r.scenario == scenario)
        .collect()
}

pub fn summary(results: &Results) -> String {
    let e = &results.environment;
    let mut md = String::from("# Benchmark summary\n\n");
    let _ = writeln!(md, "- machine: {} ({} CPUs)", e.machine, e.cpus);
    let _ = writeln!(md, "- kernel: {}", e.kernel);
    let _ = writeln!(md, "- commit: {}", e.commit);
    let _ = writeln!(md, "- started: {}", e.started);
    let _ = writeln!(md, "- mode: {}", e.mode);
    let _ = writeln!(md, "- command: `{}`", e.command);
    let _ = writeln!(md, "- traffic generator: {}", e.generator);
    let _ = writeln!(md, "- CPU cost: {}", e.cpu_cost);
    for note in &e.notes {
        let _ = writeln!(md, "- note: {note}");
    }
    md.push_str(
        "\nMedians over rounds, spread min–max in brackets. Ratios are ours over the \
         peer, taken round by round (the same round's measurements) and then the median; \
         above 1 means ours is better (more packets per second, or less cost or \
         latency).\n",
    );
    let headline: Vec<&Ratio> = results
        .ratios
        .iter()
        .filter(|r| r.metric.starts_with("delivered") || r.metric.contains("p50"))
        .collect();
    if !headline.is_empty() {
        md.push_str("\n## Headline ratios\n\n| scenario | case | metric | over | ratio |\n|---|---|---|---|---|\n");
        for r in headline {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | **{:.2}x** ({:.2}–{:.2}) |",
                r.scenario, r.case, r.metric, r.peer, r.median, r.min, r.max
            );
        }
    }
    for ((part, scenario), records) in results.scenarios() {
        let _ = writeln!(md, "\n## {scenario}\n\n(part `{part}`)\n");
        let systems = systems(&records);
        for (metric, unit) in metrics(&records) {
            let _ = writeln!(md, "{metric} ({unit}):\n");
            let mut header = String::from("| case |");
            let mut rule = String::from("|---|");
            for s in &systems {
                let _ = write!(header, " {s} |");
                rule.push_str("---:|");
            }
            let peers: Vec<&String> = systems
                .iter()
                .filter(|s| *s != "ours" && *s != "floor")
                .collect();
            for p in &peers {
                let _ = write!(header, " ours/{p} |");
                rule.push_str("---:|");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            for case in cases(&records, &metric) {
                let mut line = format!("| {case} |");
                for s in &systems {
                    let cell = records
                        .iter()
                        .find(|r| r.metric == metric && case_label(r) == case && &r.system == s)
                        .map(|r| {
                            format!("{} ({}–{})", number(r.median), number(r.min), number(r.max))
                        })
                        .unwrap_or_else(|| "–".into());
                    let _ = write!(line, " {cell} |");
                }
                for p in &peers {
                    let cell = ratios_of(results, &part, &scenario)
                        .into_iter()
                        .find(|r| r.metric == metric && &&r.peer == p && r.case == case)
                        .map(|r| format!("{:.2}x ({:.2}–{:.2})", r.median, r.min, r.max))
                        .unwrap_or_else(|| "–".into());
                    let _ = write!(line, " {cell} |");
                }
                let _ = writeln!(md, "{line}");
            }
            md.push('\n');
        }
        let checks: Vec<&String> =
            records
                .iter()
                .flat_map(|r| &r.checks)
                .fold(vec![], |mut seen, c| {
                    if !seen.contains(&c) {
                        seen.push(c);
                    }
                    seen
                });
        if !checks.is_empty() {
            md.push_str("Checked on every measurement:\n");
            for c in checks {
                let _ = writeln!(md, "- {c}");
            }
        }
    }
    md
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Wide enough for `title` at the plots' title size.
fn width_for(title: &str, plot: f64) -> f64 {
    plot.max(20.0 + 8.5 * title.chars().count() as f64)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn colour(systems: &[String], system: &str) -> &'static str {
    if system == "floor" {
        return "#bbbbbb";
    }
    let i = systems.iter().position(|s| s == system).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

/// Horizontal grouped bars: one group per case, one bar per system, whiskers min–max.
fn bar_chart(title: &str, unit: &str, records: &[&Record], caption: &str) -> String {
    let systems = systems(records);
    let metric = &records[0].metric;
    let cases = cases(records, metric);
    let bar_h = 14.0;
    let group_h = bar_h * systems.len() as f64 + 10.0;
    let (left, width) = (300.0, 420.0);
    let top = 40.0;
    let height = top + group_h * cases.len() as f64 + 60.0;
    let max = records
        .iter()
        .map(|r| r.max)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let x = |v: f64| left + v / max * width;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        escape(title),
        w = width_for(title, left + width + 120.0)
    );
    for (ci, case) in cases.iter().enumerate() {
        let y0 = top + ci as f64 * group_h;
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y0 + group_h / 2.0,
            escape(case)
        );
        for (si, system) in systems.iter().enumerate() {
            let Some(r) = records
                .iter()
                .find(|r| &case_label(r) == case && &r.system == system)
            else {
                continue;
            };
            let y = y0 + si as f64 * bar_h;
            let _ = write!(
                svg,
                "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"><title>{}: {} {unit} ({}–{})</title></rect>\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                x(r.median) - left,
                bar_h - 2.0,
                colour(&systems, system),
                escape(system),
                number(r.median),
                number(r.min),
                number(r.max),
                x(r.min),
                x(r.max),
                y + bar_h / 2.0 - 1.0,
                y + bar_h / 2.0 - 1.0,
                x(r.max) + 4.0,
                y + bar_h - 4.0,
                number(r.median)
            );
        }
    }
    let axis_y = top + group_h * cases.len() as f64;
    let _ = write!(
        svg,
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{axis_y}\" y2=\"{axis_y}\" stroke=\"black\"/>\
         <text x=\"{left}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} {}</text>",
        left + width,
        axis_y + 14.0,
        left + width,
        axis_y + 14.0,
        number(max),
        escape(unit)
    );
    legend(&mut svg, &systems, 10.0, axis_y + 32.0);
    let _ = write!(
        svg,
        "<text x=\"10\" y=\"{}\" font-size=\"9\" fill=\"#555\">{}</text></svg>",
        axis_y + 50.0,
        escape(caption)
    );
    svg
}

fn legend(svg: &mut String, systems: &[String], x0: f64, y: f64) {
    let mut x = x0;
    for s in systems {
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{y}\">{}</text>",
            y - 9.0,
            colour(systems, s),
            x + 14.0,
            escape(s)
        );
        x += 24.0 + 7.0 * s.len() as f64;
    }
}

/// Cost against a swept parameter, log-scaled x, one line per system (and variant).
fn sweep_chart(title: &str, records: &[&Record], caption: &str) -> String {
    let (name, unit) = (
        records[0]
            .sweep
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_default(),
        records[0].unit.clone(),
    );
    let mut series: BTreeMap<String, Vec<(f64, &Record)>> = BTreeMap::new();
    for r in records {
        let key = match &r.variant {
            Some(v) => format!("{} ({v})", r.system),
            None => r.system.clone(),
        };
        if let Some((_, x)) = r.sweep {
            series.entry(key).or_default().push((x, r));
        }
    }
    let keys: Vec<String> = {
        let mut k: Vec<String> = series.keys().cloned().collect();
        k.sort_by_key(|s| (!s.starts_with("ours"), s.clone()));
        k
    };
    // A colour per system, a dash pattern per variant.
    let system_names = systems(records);
    let mut variants: Vec<String> = vec![];
    for r in records {
        if let Some(v) = &r.variant {
            if !variants.contains(v) {
                variants.push(v.clone());
            }
        }
    }
    let style = |key: &str| -> (&'static str, &'static str) {
        let r = series[key][0].1;
        let dash = match &r.variant {
            Some(v) if variants.iter().position(|x| x == v) == Some(1) => "6 3",
            Some(v) if variants.iter().position(|x| x == v).unwrap_or(0) >= 2 => "2 2",
            _ => "none",
        };
        (colour(&system_names, &r.system), dash)
    };
    let xs: Vec<f64> = records
        .iter()
        .filter_map(|r| r.sweep.as_ref().map(|s| s.1))
        .collect();
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::MAX, f64::min).max(1.0),
        xs.iter().copied().fold(1.0_f64, f64::max),
    );
    let ymax = records
        .iter()
        .map(|r| r.max)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let (left, top, width, height) = (70.0, 40.0, 480.0, 240.0);
    let lx = |v: f64| {
        let span = (xmax.log10() - xmin.log10()).max(1e-9);
        left + (v.max(1.0).log10() - xmin.log10()) / span * width
    };
    let ly = |v: f64| top + height - v / ymax * height;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>\
         <line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>\
         <line x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} {}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (log scale)</text>",
        width_for(title, left + width + 320.0),
        top + height + 80.0,
        escape(title),
        top + height,
        left + width,
        top + height,
        top + height,
        left - 4.0,
        top + 4.0,
        number(ymax),
        escape(&unit),
        left - 4.0,
        top + height,
        left + width / 2.0,
        top + height + 30.0,
        escape(&name)
    );
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for t in ticks {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            lx(t),
            top + height + 14.0,
            count(t)
        );
    }
    for (i, key) in keys.iter().enumerate() {
        let mut points = series[key].clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (c, dash) = style(key);
        let path: Vec<String> = points
            .iter()
            .map(|(x, r)| format!("{:.1},{:.1}", lx(*x), ly(r.median)))
            .collect();
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>",
            path.join(" ")
        );
        for (x, r) in &points {
            let _ = write!(
                svg,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"{c}\"/>\
                 <circle cx=\"{0:.1}\" cy=\"{3:.1}\" r=\"3\" fill=\"{c}\"><title>{4} at {5} {6}: {7} ({8}–{9})</title></circle>",
                lx(*x),
                ly(r.min),
                ly(r.max),
                ly(r.median),
                escape(key),
                number(*x),
                escape(&name),
                number(r.median),
                number(r.min),
                number(r.max)
            );
        }
        let _ = write!(
            svg,
            "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"{c}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/><text x=\"{3}\" y=\"{4}\">{5}</text>",
            left + width + 12.0,
            left + width + 34.0,
            top + 5.0 + 16.0 * i as f64,
            left + width + 40.0,
            top + 9.0 + 16.0 * i as f64,
            escape(key)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"10\" y=\"{}\" font-size=\"9\" fill=\"#555\">{}</text></svg>",
        top + height + 60.0,
        escape(caption)
    );
    svg
}

/// Ours over each peer, one bar per (case, peer), a line at 1.
fn ratio_chart(title: &str, ratios: &[&Ratio], caption: &str) -> String {
    let (left, width, bar_h, top) = (420.0, 300.0, 16.0, 40.0);
    let max = ratios.iter().map(|r| r.max).fold(1.0_f64, f64::max) * 1.05;
    let x = |v: f64| left + v / max * width;
    let height = top + bar_h * ratios.len() as f64 + 50.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\
         <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        width_for(title, left + width + 80.0),
        escape(title)
    );
    for (i, r) in ratios.iter().enumerate() {
        let y = top + i as f64 * bar_h;
        let fill = if r.median >= 1.0 {
            "#2ca02c"
        } else {
            "#d62728"
        };
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} / {}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{fill}\"/>\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\
             <text x=\"{:.1}\" y=\"{}\">{:.2}x</text>",
            left - 6.0,
            y + bar_h - 4.0,
            escape(&format!("{}, {}", r.case, r.metric)),
            escape(&r.peer),
            x(r.median) - left,
            bar_h - 3.0,
            x(r.min),
            x(r.max),
            y + bar_h / 2.0,
            y + bar_h / 2.0,
            x(r.max) + 4.0,
            y + bar_h - 4.0,
            r.median
        );
    }
    let bottom = top + bar_h * ratios.len() as f64;
    let _ = write!(
        svg,
        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\
         <text x=\"{0:.1}\" y=\"{1}\" text-anchor=\"middle\">1x</text>\
         <text x=\"10\" y=\"{2}\" font-size=\"9\" fill=\"#555\">{3}</text></svg>",
        x(1.0),
        bottom + 14.0,
        bottom + 34.0,
        escape(caption)
    );
    svg
}

pub fn html(results: &Results) -> String {
    let caption = provenance(results);
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Packet-path benchmark</h1><p>{}</p><p>Command: <code>{}</code>. CPU cost: {}.</p>",
        escape(&caption),
        escape(&results.environment.command),
        escape(&results.environment.cpu_cost)
    );
    for note in &results.environment.notes {
        let _ = write!(body, "<p>Note: {}</p>", escape(note));
    }
    body.push_str(
        "<p>Bars: medians over rounds, whiskers min–max. Ratios: ours over the peer, \
         round by round, oriented so that above 1 means ours is better.</p>",
    );
    for ((part, scenario), records) in results.scenarios() {
        let _ = write!(body, "<h2>{}</h2>", escape(&scenario));
        for (metric, unit) in metrics(&records) {
            let of_metric: Vec<&Record> = records
                .iter()
                .copied()
                .filter(|r| r.metric == metric)
                .collect();
            let swept: Vec<f64> = of_metric
                .iter()
                .filter_map(|r| r.sweep.as_ref().map(|s| s.1))
                .fold(vec![], |mut seen, x| {
                    if !seen.contains(&x) {
                        seen.push(x);
                    }
                    seen
                });
            if swept.len() >= 2 && of_metric.iter().all(|r| r.sweep.is_some()) {
                body.push_str(&sweep_chart(
                    &format!(
                        "{scenario}: {metric} against {}",
                        of_metric[0]
                            .sweep
                            .as_ref()
                            .map(|s| s.0.as_str())
                            .unwrap_or("")
                    ),
                    &of_metric,
                    &caption,
                ));
                body.push_str("<br>");
            }
            body.push_str(&bar_chart(
                &format!("{scenario}: {metric}"),
                &unit,
                &of_metric,
                &caption,
            ));
            body.push_str("<br>");
        }
        let ratios = ratios_of(results, &part, &scenario);
        if !ratios.is_empty() {
            body.push_str(&ratio_chart(
                &format!("{scenario}: ours over each peer"),
                &ratios,
                &caption,
            ));
        }
        if records.iter().any(|r| r.better == Better::Lower) {
            body.push_str("<p>Lower is better for costs and latencies.</p>");
        }
    }
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Packet-path benchmark</title>\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:1em auto}}svg{{margin:0.5em 0}}</style>\
         </head><body>{body}</body></html>\n"
    )
}
