//! `taper bench` as a user runs it: the real binary on a fixture model,
//! its JSON report checked for shape and sense.

use std::process::Command;

use serde_json::Value;

use crate::common::fixture;

#[test]
fn bench_json_has_one_row_per_test_with_every_repetition() {
    let model = fixture("qwen2");
    let o = Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(["bench", "--model"])
        .arg(&model)
        .args(["-p", "16", "-n", "8", "-r", "2", "-o", "json"])
        // A small buffer keeps the test quick; it still exceeds most L2s.
        .args(["--bandwidth-mib", "64", "--threads", "1"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("taper runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let rows: Value = serde_json::from_slice(&o.stdout).expect("stdout is only JSON");
    let rows = rows.as_array().expect("an array of rows");
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "tg8"]);

    for (row, (n_prompt, n_gen)) in rows.iter().zip([(16, 0), (0, 8)]) {
        let test = &row["test"];
        assert_eq!(row["n_prompt"], n_prompt, "{test}");
        assert_eq!(row["n_gen"], n_gen, "{test}");
        assert_eq!(row["n_depth"], 0, "{test}");
        assert_eq!(row["repetitions"], 2, "{test}");
        assert_eq!(row["threads"], 1, "{test}");
        assert_eq!(row["dtype"], "f32", "{test}");
        assert!(row["quant"].is_null(), "{test}");
        assert_eq!(row["device"], "cpu", "{test}");
        assert_eq!(row["architecture"], "Qwen2ForCausalLM", "{test}");
        assert!(row["model"].as_str().unwrap().ends_with("qwen2"), "{test}");
        let params = row["n_params"].as_u64().unwrap();
        assert!(params > 0, "{test}");
        // f32 weights: four bytes a parameter.
        assert_eq!(row["size_bytes"].as_u64(), Some(4 * params), "{test}");

        let positive = |key: &str| {
            let v = row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{test}: {key} missing"));
            assert!(v > 0.0 && v.is_finite(), "{test}: {key} = {v}");
            v
        };
        let mean = positive("mean_ts");
        assert!(row["stddev_ts"].as_f64().unwrap() >= 0.0, "{test}");
        positive("memory_bandwidth_gbs");

        let samples_s = row["samples_s"].as_array().unwrap();
        let samples_ts = row["samples_ts"].as_array().unwrap();
        assert_eq!(samples_s.len(), 2, "{test}: one sample per repetition");
        assert_eq!(samples_ts.len(), 2, "{test}");
        let mut sum = 0.0;
        for (s, ts) in samples_s.iter().zip(samples_ts) {
            let (s, ts) = (s.as_f64().unwrap(), ts.as_f64().unwrap());
            assert!(s > 0.0 && ts > 0.0, "{test}");
            let tokens = (n_prompt + n_gen) as f64;
            assert!(
                (ts - tokens / s).abs() <= 1e-6 * ts,
                "{test}: t/s = tokens / s"
            );
            sum += ts;
        }
        assert!(
            (mean - sum / 2.0).abs() <= 1e-9 * mean,
            "{test}: mean of samples"
        );
    }
    // The bandwidth bound applies to generation rows only.
    assert!(rows[0]["bound_ts"].is_null());
    assert!(rows[1]["bound_ts"].as_f64().unwrap() > 0.0);
    assert!(rows[1]["bound_share"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_rejects_nothing_to_measure_and_too_long_contexts() {
    let model = fixture("qwen2");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_taper"))
            .args(["bench", "--model"])
            .arg(&model)
            .args(["--bandwidth-mib", "0"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("taper runs")
    };
    let o = run(&["-p", "0", "-n", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to measure"));

    // The fixture's context is 512 positions.
    let o = run(&["-p", "16", "-n", "0", "-d", "500"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pp16 @ d500 needs 516 positions") && err.contains("512"),
        "{err}"
    );

    let o = run(&["-r", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--repetitions` must be >= 1"));
}

/// A mixture-of-experts model's decode step reads the router and the
/// `top_k` routed experts of each layer, not every expert: the bandwidth
/// bound counts those bytes. (Mixtral fixture: 3 layers of 5 experts, top-2,
/// hidden 64, expert width 128, untied 384-token embeddings, f32.)
#[test]
fn a_moe_models_bytes_per_token_count_the_routed_experts() {
    let o = Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(["bench", "--model"])
        .arg(fixture("mixtral"))
        .args(["-p", "0", "-n", "2", "-r", "1", "-o", "json"])
        .args(["--bandwidth-mib", "16", "--threads", "1"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("taper runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let row = &rows[0];
    let size = row["size_bytes"].as_u64().expect("size");
    let per_token = row["weight_bytes_per_token"].as_u64().expect("bytes per token");
    let embedding_rows_not_read = 383 * 64 * 4;
    let unrouted_experts = 3 * (5 - 2) * 3 * 64 * 128 * 4;
    assert_eq!(per_token, size - embedding_rows_not_read - unrouted_experts);
}
