//! A model file is input too: any bytes given as a GGUF file load or fail
//! with an error; never a panic, never an allocation beyond the file's size.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use candle_core::Device;
use inferd_models::gguf::GgufFile;
use inferd_models::{LlamaConfig, TextTokenizer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = GgufFile::from_reader(Cursor::new(data), Path::new("fuzz.gguf")) else { return };
    let _ = TextTokenizer::from_gguf(&file.content);
    if let Ok(cfg) = LlamaConfig::from_gguf(&file.content) {
        let _ = file.weights(&cfg, &Device::Cpu);
    }
});
