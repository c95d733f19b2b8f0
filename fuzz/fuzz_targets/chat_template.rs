//! SmolLM2's chat template (read from the default model) rendering hostile
//! conversations: any roles, any text, any number of messages.
#![no_main]

use std::sync::OnceLock;

use inferd_models::ChatMessage;
use inferd_models::ChatTemplate;
use libfuzzer_sys::fuzz_target;

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("INFERD_FUZZ_MODEL")
            .unwrap_or_else(|_| "../models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        inferd_models::load_text(std::path::Path::new(&path))
            .expect("the default model (make model)")
            .1
            .expect("SmolLM2 ships a chat template")
    })
}

fuzz_target!(|data: &[u8]| {
    // Messages separated by 0x00, role and content by 0x01.
    let text = String::from_utf8_lossy(data);
    let messages: Vec<ChatMessage> = text
        .split('\0')
        .map(|m| match m.split_once('\u{1}') {
            Some((role, content)) => ChatMessage::new(role, content),
            None => ChatMessage::new("user", m),
        })
        .collect();
    for add_generation_prompt in [false, true] {
        let _ = template().render(&messages, add_generation_prompt);
    }
});
