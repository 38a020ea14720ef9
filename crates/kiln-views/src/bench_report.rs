//! `kiln bench train`'s report (the JSON it writes) for humans: the table printed at the end and
//! the row appended to `docs/bench/train.md`, whose history the rows make.

use serde_json::Value;

/// The head of a new `docs/bench/train.md`.
pub const HEADER: &str = "# Training throughput\n\n\
Appended by `cargo xtask bench train <recipe> [--steps N] [--rounds N] [--note \"...\"]`; one row per run. Tokens/s are target \
tokens per second of steady-state training (after the warm-up) over the measured sync windows' wall time; the PyTorch \
columns are the reference in `benches/peer/` on the same batches, architecture, loss, optimizer and thread count, run \
right after kiln by the same command, eagerly and under `torch.compile`. Ratios measured in one run are the figures to \
compare; absolute values move with the machine's load.\n";

/// The table's head (from the rows with MFU and `torch.compile` on).
pub const TABLE_HEAD: &str = "| date | commit | change measured (prediction) | recipe | steps | kiln tok/s | PyTorch eager tok/s | PyTorch compile tok/s | kiln / eager | kiln / compile | kiln model GFLOP/s | MFU: of measured peak / of FMA peak | step ms median / p90 | sync % | data wait % | peak RSS MiB (per epoch) |";

/// Where that table starts in a file that has older rows.
pub const SECTION: &str = "\n## Rows with MFU and torch.compile\n\n\
Model FLOPs per second are counted from the architecture and each measured batch's real tokens \
(`crates/kiln-families/src/flops.rs`: every linear layer on real tokens, attention's two products \
over each sequence's real length, the output projection on labelled positions; training = 3 × \
forward), over the measured windows' wall time. MFU is their share of this machine's peak: the \
largest rate Flex's matrix product reaches in a short probe at the start of the bench, and the \
FMA peak `/proc/cpuinfo` implies (threads × clock × f32 FLOPs a cycle). Ratios are medians of \
the alternated rounds.\n\n\
| date | commit | change measured (prediction) | recipe | steps | kiln tok/s | PyTorch eager tok/s | PyTorch compile tok/s | kiln / eager | kiln / compile | kiln model GFLOP/s | MFU: of measured peak / of FMA peak | step ms median / p90 | sync % | data wait % | peak RSS MiB (per epoch) |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|x| format!("{x:.1} %")).unwrap_or_else(|| "-".into())
}

/// One Markdown row of a report.
pub fn row(r: &Value) -> String {
    let k = &r["kiln"];
    let per_epoch: Vec<String> = k["rss_per_epoch_mb"].as_array().map(|a| a.iter().map(|v| num(v, 0)).collect()).unwrap_or_default();
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | **{}** | **{}** | {} | {} / {} | {} / {} | {} | {} | {} ({}) |\n",
        r["date"].as_str().unwrap_or("-"),
        r["commit"].as_str().unwrap_or("-"),
        r["note"].as_str().filter(|n| !n.is_empty()).unwrap_or("-").replace('|', "/"),
        k["recipe"].as_str().unwrap_or("-"),
        k["steps"],
        num(&k["tokens_per_s"], 0),
        num(&r["peer"]["tokens_per_s"], 0),
        num(&r["compiled"]["tokens_per_s"], 0),
        ratio_cell(r, "ratio"),
        ratio_cell(r, "ratio_compile"),
        num(&r["mfu"]["kiln_gflops"], 1),
        pct(&r["mfu"]["kiln_pct_of_measured"]),
        pct(&r["mfu"]["kiln_pct_of_theoretical"]),
        num(&k["step_ms_median"], 0),
        num(&k["step_ms_p90"], 0),
        num(&k["sync_pct"], 2),
        num(&k["data_wait_pct"], 2),
        num(&k["peak_rss_mb"], 0),
        per_epoch.join(", "),
    )
}

/// The ratio, and with several rounds the range it is the median of.
fn ratio_cell(r: &Value, key: &str) -> String {
    let Some(ratio) = r[key].as_f64() else { return "-".into() };
    let ratios: Vec<f64> = r["rounds"].as_array().map(|a| a.iter().filter_map(|x| x[key].as_f64()).collect()).unwrap_or_default();
    if ratios.len() < 2 {
        return format!("{ratio:.2}×");
    }
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{ratio:.2}× (median of {}: {lo:.2}–{hi:.2})", ratios.len())
}

/// The table printed at the end of a run.
pub fn table(r: &Value) -> String {
    let k = &r["kiln"];
    let p = &r["peer"];
    let mut rows: Vec<(&str, String)> = vec![
        ("recipe / device", format!("{} / {} ({} threads)", k["recipe"].as_str().unwrap_or("-"), k["device"].as_str().unwrap_or("-"), k["threads"])),
        ("steps (after warm-up)", format!("{} (warm-up {})", k["steps"], k["warmup_steps"])),
        ("kiln target tok/s", num(&k["tokens_per_s"], 0)),
        ("kiln step ms median / p90", format!("{} / {}", num(&k["step_ms_median"], 1), num(&k["step_ms_p90"], 1))),
        ("kiln wall: sync / data wait / compute", format!("{} % / {} % / {} %", num(&k["sync_pct"], 2), num(&k["data_wait_pct"], 2), num(&k["compute_pct"], 2))),
        ("kiln peak RSS (per epoch)", format!("{} MiB ({})", num(&k["peak_rss_mb"], 0), k["rss_per_epoch_mb"])),
        ("kiln first window Σ loss", num(&k["first_window_loss_sum"], 2)),
    ];
    if p.is_object() {
        rows.push(("PyTorch target tok/s", format!("{} (torch {}, {} threads, {})", num(&p["tokens_per_s"], 0), p["torch"].as_str().unwrap_or("?"), p["threads"], p["cpu_capability"].as_str().unwrap_or("?"))));
        rows.push(("PyTorch step ms median / p90", format!("{} / {}", num(&p["step_ms_median"], 1), num(&p["step_ms_p90"], 1))));
        rows.push(("PyTorch first window Σ loss", num(&p["first_window_loss_sum"], 2)));
        rows.push(("kiln / PyTorch eager", ratio_cell(r, "ratio")));
        let c = &r["compiled"];
        if c.is_object() {
            rows.push(("PyTorch torch.compile tok/s", format!("{} (step ms median {})", num(&c["tokens_per_s"], 0), num(&c["step_ms_median"], 1))));
            rows.push(("kiln / PyTorch torch.compile", ratio_cell(r, "ratio_compile")));
        }
        if let Some(rounds) = r["rounds"].as_array().filter(|a| a.len() > 1) {
            let each: Vec<String> = rounds
                .iter()
                .map(|x| format!("{} / {} / {} = {} / {}", num(&x["kiln_tokens_per_s"], 0), num(&x["peer_tokens_per_s"], 0), num(&x["compile_tokens_per_s"], 0), num(&x["ratio"], 3), num(&x["ratio_compile"], 3)))
                .collect();
            rows.push(("rounds (kiln / eager / compile tok/s)", each.join("; ")));
        }
    }
    let m = &r["mfu"];
    if m.is_object() {
        let peak = &r["peak"];
        rows.push(("model FLOPs per token", format!("{:.3e}", k["flops_per_token"].as_f64().unwrap_or(f64::NAN))));
        rows.push(("kiln model GFLOP/s", num(&m["kiln_gflops"], 1)));
        rows.push((
            "peak: measured / FMA",
            format!("{} GFLOP/s (Flex matmul {}) / {} GFLOP/s ({})", num(&peak["measured_gflops"], 1), peak["probe"].as_str().unwrap_or("-"), num(&peak["theoretical_gflops"], 1), peak["theoretical_from"].as_str().unwrap_or("not reported")),
        ));
        rows.push(("kiln MFU: of measured / of FMA peak", format!("{} / {}", pct(&m["kiln_pct_of_measured"]), pct(&m["kiln_pct_of_theoretical"]))));
        if m["peer_gflops"].is_number() {
            rows.push(("PyTorch eager / compile GFLOP/s", format!("{} / {}", num(&m["peer_gflops"], 1), num(&m["compile_gflops"], 1))));
        }
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("  {k:<width$}  {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_and_table_show_the_ratio_and_the_peer() {
        let r = serde_json::json!({
            "date": "2026-11-29T10-00-00", "commit": "abc1234", "note": "baseline | first",
            "kiln": { "recipe": "quickstart", "device": "cpu", "threads": 2, "steps": 60, "warmup_steps": 10, "tokens_per_s": 1234.4,
                      "step_ms_median": 800.0, "step_ms_p90": 900.0, "sync_pct": 0.01, "data_wait_pct": 0.2, "compute_pct": 99.79,
                      "peak_rss_mb": 512.0, "rss_per_epoch_mb": [500.0, 510.0], "first_window_loss_sum": 100.0 },
            "peer": { "tokens_per_s": 2468.8, "torch": "2.15.0", "threads": 2, "cpu_capability": "AVX512", "step_ms_median": 400.0, "step_ms_p90": 450.0, "first_window_loss_sum": 101.0 },
            "compiled": { "tokens_per_s": 3086.0, "step_ms_median": 320.0 },
            "ratio": 0.5, "ratio_compile": 0.4,
            "peak": { "measured_gflops": 120.0, "probe": "1024×1024 · 1024×1024", "theoretical_gflops": 166.4, "theoretical_from": "2 threads × 2.60 GHz × 32 FLOP/cycle (AVX2 FMA)" },
            "mfu": { "kiln_gflops": 60.0, "kiln_pct_of_measured": 50.0, "kiln_pct_of_theoretical": 36.06, "peer_gflops": 120.0, "compile_gflops": 150.0 },
        });
        let line = row(&r);
        assert!(line.contains("| 1234 | 2469 | 3086 | **0.50×** | **0.40×** | 60.0 | 50.0 % / 36.1 % | 800 / 900 |") && line.contains("baseline / first") && line.contains("512 (500, 510)"), "{line}");
        assert_eq!(line.matches('|').count(), TABLE_HEAD.matches('|').count(), "as many columns as the header");
        assert!(SECTION.contains(TABLE_HEAD) && SECTION.trim_end().lines().last().unwrap().matches('|').count() == TABLE_HEAD.matches('|').count());
        let t = table(&r);
        assert!(t.contains("kiln / PyTorch eager") && t.contains("0.50×") && t.contains("torch 2.15.0"), "{t}");
        assert!(t.contains("kiln / PyTorch torch.compile") && t.contains("0.40×") && t.contains("50.0 % / 36.1 %") && t.contains("AVX2 FMA"), "{t}");
        let alone = table(&serde_json::json!({ "kiln": r["kiln"], "peer": null, "ratio": null }));
        assert!(!alone.contains("PyTorch"), "{alone}");
    }

    #[test]
    fn several_rounds_show_the_median_and_the_range() {
        let mut r = serde_json::json!({
            "kiln": { "recipe": "quickstart", "tokens_per_s": 1000.0 }, "peer": { "tokens_per_s": 2000.0 }, "ratio": 0.5,
            "rounds": [
                { "kiln_tokens_per_s": 900.0, "peer_tokens_per_s": 2250.0, "ratio": 0.4 },
                { "kiln_tokens_per_s": 1000.0, "peer_tokens_per_s": 2000.0, "ratio": 0.5 },
                { "kiln_tokens_per_s": 1400.0, "peer_tokens_per_s": 2000.0, "ratio": 0.7 },
            ],
        });
        assert!(row(&r).contains("**0.50× (median of 3: 0.40–0.70)**"), "{}", row(&r));
        assert!(table(&r).contains("900 / 2250 / - = 0.400 / -; 1000 / 2000 / - = 0.500 / -; 1400 / 2000 / - = 0.700 / -"), "{}", table(&r));
        r["rounds"] = serde_json::json!([{ "ratio": 0.5 }]);
        assert!(row(&r).contains("**0.50×**"), "one round: the ratio alone");
    }
}
