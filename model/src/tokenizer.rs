//! Tokenizer and chat template: the `tokenizers` crate built from `tokenizer.json` or from GGUF
//! metadata, templates rendered with `minijinja` the way transformers renders them.

use crate::weights::gguf::{GgufFile, GgufValue};
use serde_json::{json, Value};
use std::path::Path;

/// Errors building a tokenizer or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        message: String,
    },
    /// The tokenizer definition is unusable.
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The chat template failed to render (or raised an exception).
    #[error("chat template error: {0}")]
    Template(String),
}

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let io = |e: String| TokenizerError::Io {
        path: path.display().to_string(),
        message: e,
    };
    let text = std::fs::read_to_string(path).map_err(|e| io(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| io(e.to_string()))
}

/// A special token given either as a string or as `{"content": ...}` (tokenizer_config.json).
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from an HF
    /// model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                chat_template = std::fs::read_to_string(&jinja).ok();
            }
        }
        let bos_token = token_str(cfg.get("bos_token"));
        let eos_token = token_str(cfg.get("eos_token"));
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut eos_token_ids = ids(gen.get("eos_token_id"));
        if eos_token_ids.is_empty() {
            eos_token_ids = ids(model_cfg.get("eos_token_id"));
        }
        if eos_token_ids.is_empty() {
            if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
                eos_token_ids.push(id);
            }
        }
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
            add_bos,
        })
    }

    /// Builds the tokenizer a GGUF file describes (GPT-2 style byte-level BPE).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let invalid = |m: &str| TokenizerError::Invalid(m.to_string());
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| invalid("GGUF has no tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizerError::Invalid(format!(
                "GGUF tokenizer model '{model}' is not supported (only gpt2-style BPE); \
                 load the HF checkpoint with tokenizer.json instead"
            )));
        }
        let tokens: Vec<&str> = g
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .ok_or_else(|| invalid("GGUF has no tokenizer.ggml.tokens"))?
            .iter()
            .map(|t| t.as_str().unwrap_or(""))
            .collect();
        let merges: Vec<&str> = g
            .get("tokenizer.ggml.merges")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().filter_map(GgufValue::as_str).collect())
            .unwrap_or_default();
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        // GGUF token types: 3 = control, 4 = user-defined; both are matched whole in text.
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens.get(i).copied().unwrap_or(""),
                       "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": t == 3})
            })
            .collect();
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": use_regex})
        };
        let split = |pattern: &str| {
            json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                   "invert": false})
        };
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        let pre_tokenizer = match pre {
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            // llama.cpp's "smollm": every digit alone, then the GPT-2 split.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false)]}),
            other => {
                return Err(TokenizerError::Invalid(format!(
                    "GGUF pre-tokenizer '{other}' is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"
                )))
            }
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Invalid(e.to_string()))?;
        let id = |k: &str| g.get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let tok = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        Ok(Tokenizer {
            inner,
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
            bos_token: tok(bos),
            eos_token: tok(eos),
            eos_token_ids: eos.into_iter().collect(),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(GgufValue::as_bool)
                .unwrap_or(false),
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, a BOS is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some(b) = self
                .bos_token
                .as_deref()
                .and_then(|t| self.inner.token_to_id(t))
            {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Invalid(e.to_string()))
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`) with the chat template.
    ///
    /// Like transformers: `trim_blocks` and `lstrip_blocks` on, `raise_exception` available,
    /// `bos_token`/`eos_token`/`add_generation_prompt` in the context, plus `extra` keys
    /// (`chat_template_kwargs`).
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let tmpl = env
            .template_from_str(template)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = extra {
            ctx.extend(extra.clone());
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), json!(add_generation_prompt));
        ctx.insert(
            "bos_token".into(),
            json!(self.bos_token.clone().unwrap_or_default()),
        );
        ctx.insert(
            "eos_token".into(),
            json!(self.eos_token.clone().unwrap_or_default()),
        );
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
