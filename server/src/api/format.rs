//! Engine outputs to vLLM's JSON shapes: token strings, completion and chat logprobs, prompt
//! logprobs, weight-version spans, and the stream that merges several prompts' outputs.

use super::protocol::{
    ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs, OrderedMap, PromptLogprob,
    WeightVersionSpan,
};
use crate::engine::{GeneratedToken, RequestOutput, StopReason, TokenLogprob};
use futures::stream::{self, BoxStream, StreamExt};
use halfstep_model::Tokenizer;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

/// How token strings are spelled.
#[derive(Clone, Copy)]
pub struct TokenText<'a> {
    /// The tokenizer.
    pub tok: &'a Tokenizer,
    /// `token_id:<id>` instead of text (`return_tokens_as_token_ids`).
    pub as_ids: bool,
}

impl TokenText<'_> {
    /// The string of one token.
    pub fn of(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.tok.decode(&[id], false).unwrap_or_default()
        }
    }
}

/// vLLM writes -inf log-probabilities as -9999.0 in chat responses.
pub fn chat_lp(x: f32) -> f32 {
    if x == f32::NEG_INFINITY {
        -9999.0
    } else {
        x
    }
}

/// `stop_reason` as JSON: the stop string, the stop token id, or null.
pub fn stop_reason(r: &Option<StopReason>) -> Option<Value> {
    match r {
        Some(StopReason::Text(s)) => Some(Value::String(s.clone())),
        Some(StopReason::Token(t)) => Some(Value::from(*t)),
        None => None,
    }
}

/// Appends tokens to completion logprobs; `prompt` entries come from prompt logprobs.
pub struct CompletionLogprobsBuilder {
    /// What is built so far.
    pub out: CompletionLogprobs,
    offset: usize,
}

impl CompletionLogprobsBuilder {
    /// Starts at character `offset` of the choice's text.
    pub fn new(offset: usize) -> Self {
        CompletionLogprobsBuilder {
            out: CompletionLogprobs::default(),
            offset,
        }
    }

    fn push(&mut self, text: String, lp: Option<f32>, top: Option<OrderedMap<f32>>) {
        self.out.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.out.tokens.push(text);
        self.out.token_logprobs.push(lp);
        self.out.top_logprobs.push(top);
    }

    /// Adds prompt tokens (echo): the first has no logprob.
    pub fn push_prompt(&mut self, tt: TokenText, ids: &[u32], lps: &[Option<TokenLogprob>]) {
        for (i, &id) in ids.iter().enumerate() {
            match lps.get(i).and_then(|x| x.as_ref()) {
                Some(lp) => self.push(tt.of(id), Some(lp.logprob), Some(top_map(tt, lp))),
                None => self.push(tt.of(id), None, None),
            }
        }
    }

    /// Adds generated tokens.
    pub fn push_generated(&mut self, tt: TokenText, toks: &[GeneratedToken]) {
        for t in toks {
            let lp = t.logprob.as_ref();
            self.push(
                tt.of(t.token),
                lp.map(|l| l.logprob),
                lp.map(|l| top_map(tt, l)),
            );
        }
    }
}

/// The sampled token and its alternatives as `{token: logprob}` (vLLM includes the sampled one).
fn top_map(tt: TokenText, lp: &TokenLogprob) -> OrderedMap<f32> {
    let mut m = OrderedMap::default();
    m.insert_first(tt.of(lp.token), lp.logprob);
    for &(id, v) in &lp.top {
        m.insert_first(tt.of(id), v);
    }
    m
}

/// Chat `logprobs.content` entries of generated tokens.
pub fn chat_logprobs(tt: TokenText, toks: &[GeneratedToken], k: usize) -> ChatLogprobs {
    let content = toks
        .iter()
        .filter_map(|t| {
            let lp = t.logprob.as_ref()?;
            let s = tt.of(t.token);
            Some(ChatTokenLogprob {
                bytes: Some(s.as_bytes().to_vec()),
                token: s,
                logprob: chat_lp(lp.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .take(k)
                    .map(|&(id, v)| {
                        let s = tt.of(id);
                        ChatTopLogprob {
                            bytes: Some(s.as_bytes().to_vec()),
                            token: s,
                            logprob: chat_lp(v),
                        }
                    })
                    .collect(),
            })
        })
        .collect();
    ChatLogprobs {
        content: Some(content),
    }
}

/// `prompt_logprobs`: `[null, {"<id>": {logprob, rank, decoded_token}}, ...]`.
pub type PromptLogprobsJson = Vec<Option<OrderedMap<PromptLogprob>>>;

/// Formats prompt logprobs (the prompt token itself plus the top `k`).
pub fn prompt_logprobs(
    tt: TokenText,
    prompt: &[u32],
    lps: &[Option<TokenLogprob>],
    k: usize,
) -> PromptLogprobsJson {
    lps.iter()
        .enumerate()
        .map(|(i, lp)| {
            let lp = lp.as_ref()?;
            let mut m = OrderedMap::default();
            m.insert_first(
                prompt[i].to_string(),
                PromptLogprob {
                    logprob: lp.logprob,
                    rank: lp.rank,
                    decoded_token: tt.of(prompt[i]),
                },
            );
            for (r, &(id, v)) in lp.top.iter().take(k).enumerate() {
                m.insert_first(
                    id.to_string(),
                    PromptLogprob {
                        logprob: v,
                        rank: r + 1,
                        decoded_token: tt.of(id),
                    },
                );
            }
            Some(m)
        })
        .collect()
}

/// Weight versions of a choice: the last token's, and spans when more than one produced it.
pub fn weight_versions(toks: &[GeneratedToken]) -> (Option<u64>, Option<Vec<WeightVersionSpan>>) {
    let mut spans: Vec<WeightVersionSpan> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match spans.last_mut() {
            Some(s) if s.version == t.weight_version => s.end = i + 1,
            _ => spans.push(WeightVersionSpan {
                version: t.weight_version,
                start: i,
                end: i + 1,
            }),
        }
    }
    let last = spans.last().map(|s| s.version);
    (last, (spans.len() > 1).then_some(spans))
}

/// Merges the output channels of several prompts into one stream of `(prompt_index, output)`.
/// Dropping the stream drops every receiver, which aborts the requests in the engine.
pub fn merge(
    rxs: Vec<UnboundedReceiver<RequestOutput>>,
) -> BoxStream<'static, (usize, RequestOutput)> {
    let streams = rxs.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, move |mut rx| async move {
            rx.recv().await.map(|o| ((i, o), rx))
        })
        .boxed()
    });
    stream::select_all(streams).boxed()
}
