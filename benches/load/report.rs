//! Printing tables and writing `target/bench-results/<scenario>.json` with the
//! machine the figures were measured on.

use serde_json::{Value, json};

use crate::systems::results_dir;

/// nproc, CPU model, kernel, rustc: what BENCHMARKS.md states per figure.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024 / 1024);
    json!({"nproc": nproc, "cpu": cpu, "kernel": kernel, "rustc": rustc, "memory_gib": mem})
}

/// Writes the scenario's results (with the machine and the command line).
pub fn write(scenario: &str, results: Value) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let doc = json!({
        "scenario": scenario,
        "command": format!("cargo bench --bench load -- {}", args.join(" ")),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": machine(),
        "results": results,
    });
    let path = results_dir().join(format!("{scenario}.json"));
    match serde_json::to_string_pretty(&doc).map(|s| std::fs::write(&path, s)) {
        Ok(Ok(())) => println!("wrote {}", path.display()),
        _ => eprintln!("could not write {}", path.display()),
    }
}

/// A plain text table: a header row and rows, columns padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect();
        println!("  {}", padded.join("  "));
    };
    line(header.to_vec());
    line(
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `met` / `MISSED` against a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
