//! The real SmolLM2 tokenizer and chat template, rebuilt from GGUF metadata.

use inferd_models::gguf::GgufFile;
use inferd_models::testing::smollm2_path;
use inferd_models::{ChatMessage, TextTokenizer, load};

fn tokenizer() -> TextTokenizer {
    let file = GgufFile::open(&smollm2_path()).unwrap();
    TextTokenizer::from_gguf(&file.content).unwrap()
}

#[test]
fn known_ids_match_the_reference() {
    let tok = tokenizer();
    assert_eq!(tok.encode("Hello").unwrap(), [19556], "no prefix space");
    assert_eq!(tok.encode("user").unwrap(), [4093]);
    assert_eq!(tok.encode(" Hello").unwrap().len(), 1);
    assert_ne!(tok.encode(" Hello").unwrap(), [19556]);
    assert_eq!(tok.encode("<|im_start|>").unwrap(), [1], "control tokens match whole");
    assert_eq!(tok.eos_token_ids, [0, 2], "<|endoftext|> and <|im_end|> end generation");
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn digits_are_split_one_by_one() {
    let tok = tokenizer();
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    let texts: Vec<String> = ids.iter().map(|&i| tok.decode(&[i], false).unwrap()).collect();
    assert_eq!(texts, ["2", "0", "2", "4"]);
}

#[test]
fn round_trips_text() {
    let tok = tokenizer();
    for text in ["Hello, world!", "  leading spaces\n\ttabs", "Ünïcödé — 東京 🚀", "x = 3.14159; // pi", ""]
    {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn chat_template_adds_the_default_system_message() {
    let loaded = load(&smollm2_path(), &Default::default()).unwrap();
    let template = loaded.chat_template.as_ref().expect("SmolLM2 ships a chat template");
    let prompt =
        template.render(&[ChatMessage::new("user", "What is the capital of France?")], true).unwrap();
    assert!(prompt.starts_with(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    ));
    assert!(prompt.ends_with("<|im_start|>assistant\n"));
    assert_eq!(loaded.tokenizer.encode(&prompt).unwrap().len(), 37, "llama.cpp renders 37 tokens");
}
