//! Streaming detokenization on real tokenizers: byte-level BPE (Qwen3,
//! Llama 3.1) and SentencePiece with byte fallback (Llama 2, Gemma 3). Text
//! streams token by token with no broken UTF-8, and the pieces concatenate
//! to exactly the full decode.

use taper::tokenizer::{StreamDecoder, Tokenizer};

use crate::common::real_tokenizer_dir;

const TEXTS: [&str; 4] = [
    " Hello world,  two spaces and a leading one.\nNew line.",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🦀🚀👩‍👩‍👧 with ZWJ and flags 🇫🇷, accents é ü ß",
    "code: fn main() { println!(\"{}\", 1 + 2); }\t\ttabs",
];

#[test]
fn pieces_are_valid_utf8_and_concatenate_to_the_full_decode() {
    for name in ["qwen3", "llama3_1", "llama2", "gemma3"] {
        let dir = real_tokenizer_dir(name);
        let tok = Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for text in TEXTS {
            let ids = tok.encode_plain(text).expect("encodes");
            let mut stream = StreamDecoder::new(true);
            let mut out = String::new();
            let mut pieces = 0;
            for &id in &ids {
                let piece = stream.push(&tok, id).expect("decodes");
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{name}: broken UTF-8 piece {piece:?} in {text:?}"
                );
                pieces += usize::from(!piece.is_empty());
                out.push_str(&piece);
            }
            out.push_str(&stream.finish(&tok).expect("finishes"));
            assert_eq!(
                out,
                tok.decode(&ids, true).expect("decodes"),
                "{name}: {text:?}"
            );
            // Text arrives as it is generated, not all at the end.
            assert!(
                pieces > ids.len() / 3,
                "{name}: only {pieces} pieces for {} tokens",
                ids.len()
            );
        }
    }
}
