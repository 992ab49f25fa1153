//! `validate` is linear in its input, and no input makes it crash or hang: runbooks of 1,000
//! to 8,000 steps (valid, every id duplicated, every `needs` unknown), beside inputs built to
//! hurt (nesting 9,000 deep, a 50 MB file, an alias bomb), each with its time; then the
//! process's peak memory. The baseline is the same generator at 1,000 steps, measured in the
//! same run: the time per step at 8,000 must stay within 3x of it, and each hostile input must
//! be refused within a second.
//!
//! Run: `cargo bench --bench validate`.

use std::time::{Duration, Instant};

use kmsflow_engine::{Registry, RunbookSource, compile};

fn valid(n: usize) -> String {
    let mut text = String::from(
        "name: wide\nsteps:\n  - id: s0\n    uses: noop\n    with: { outputs: { v: 1 } }\n",
    );
    for i in 1..n {
        text.push_str(&format!(
            "  - id: s{i}\n    uses: noop\n    needs: [s{}]\n    with: {{ outputs: {{ v: '{{{{ steps.s{}.outputs.v }}}}' }} }}\n",
            i - 1,
            i.saturating_sub(2)
        ));
    }
    text
}

fn duplicates(n: usize) -> String {
    let mut text = String::from("name: dup\nsteps:\n");
    for _ in 0..n {
        text.push_str("  - id: same\n    uses: noop\n");
    }
    text
}

fn unknown_needs(n: usize) -> String {
    let mut text = String::from("name: needs\nsteps:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - id: s{i}\n    uses: noop\n    needs: [gone{i}]\n"
        ));
    }
    text
}

fn deep(levels: usize) -> String {
    let mut text = String::from("name: deep\nsteps:\n  - id: a\n    uses: noop\n    with:\n");
    for level in 0..levels {
        text.push_str(&" ".repeat(6 + level * 2));
        text.push_str("k:\n");
    }
    text
}

fn huge(bytes: usize) -> String {
    let mut text = String::from("name: huge\nsteps:\n");
    let step = "  - id: s\n    uses: noop\n";
    while text.len() < bytes {
        text.push_str(step);
    }
    text
}

fn alias_bomb() -> String {
    let mut text = String::from(
        "name: bomb\nparams:\n  a0: { type: list, default: &a0 [x, x, x, x, x, x, x, x, x, x] }\n",
    );
    for i in 1..9 {
        let aliases = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!(
            "  a{i}: {{ type: list, default: &a{i} [{aliases}] }}\n"
        ));
    }
    text.push_str("steps:\n  - id: a\n    uses: noop\n");
    text
}

/// The best of three: compile's time for `text`, and how many problems it found.
fn time(text: &str, registry: &Registry) -> (Duration, usize) {
    let source = RunbookSource::new("bench.yaml", text.to_owned());
    let mut best = Duration::MAX;
    let mut problems = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let result = compile(&source, registry);
        best = best.min(started.elapsed());
        problems = result.err().map_or(0, |d| d.problems.len());
    }
    (best, problems)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    assert_eq!(
        time(&valid(10), &Registry::with_engine_kinds()).1,
        0,
        "the valid generator makes a valid runbook"
    );
    let registry = Registry::with_engine_kinds();
    let mut failures = Vec::new();
    println!(
        "{:<16} {:>6} {:>10} {:>12} {:>9}",
        "input", "steps", "time", "per step", "problems"
    );
    for (name, generate) in [
        ("valid", valid as fn(usize) -> String),
        ("duplicate ids", duplicates),
        ("unknown needs", unknown_needs),
    ] {
        let mut baseline = None;
        for n in [1_000, 2_000, 4_000, 8_000] {
            let (took, problems) = time(&generate(n), &registry);
            let per_step = took / n as u32;
            println!(
                "{name:<16} {n:>6} {:>8.1}ms {:>10.1}us {problems:>9}",
                took.as_secs_f64() * 1e3,
                per_step.as_secs_f64() * 1e6
            );
            let baseline = *baseline.get_or_insert(per_step);
            if n == 8_000 && per_step > baseline * 3 {
                failures.push(format!(
                    "{name}: {:.1}us per step at 8,000 against {:.1}us at 1,000: not linear",
                    per_step.as_secs_f64() * 1e6,
                    baseline.as_secs_f64() * 1e6
                ));
            }
        }
    }
    for (name, text) in [
        ("nested 9,000", deep(9_000)),
        ("50 MB file", huge(50 << 20)),
        ("alias bomb", alias_bomb()),
    ] {
        let (took, problems) = time(&text, &registry);
        println!(
            "{name:<16} {:>6} {:>8.1}ms {:>12} {problems:>9}",
            "-",
            took.as_secs_f64() * 1e3,
            "-"
        );
        if problems == 0 {
            failures.push(format!("{name}: accepted"));
        }
        if took > Duration::from_secs(1) {
            failures.push(format!("{name}: refused in {took:?}, not within a second"));
        }
    }
    if let Some(peak) = peak_rss_mib() {
        println!("peak resident memory: {peak:.0} MiB (the 50 MB input included)");
        if peak > 1024.0 {
            failures.push(format!("peak memory {peak:.0} MiB is over 1 GiB"));
        }
    }
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("FAIL {failure}");
        }
        std::process::exit(1);
    }
}
