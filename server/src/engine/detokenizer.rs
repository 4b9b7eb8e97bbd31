//! Incremental detokenisation: text deltas per step that never split a UTF-8 character, and
//! stop-string matching across token boundaries.

use halfstep_model::Tokenizer;

/// Text state of one sequence's output.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    // Offsets into the output tokens: decode(prefix..read) is text already emitted as a
    // context, decode(prefix..) the same plus the new tokens.
    prefix_offset: usize,
    read_offset: usize,
    /// The output text so far (stop string handling applied).
    pub text: String,
    // Bytes of `text` already handed out as deltas.
    emitted: usize,
}

/// A stop string found in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopMatch {
    /// The stop string that matched.
    pub stop: String,
}

impl IncrementalDetokenizer {
    /// Decodes the tokens appended since the last call (all of `output`), appends the text,
    /// and checks `stop` strings in the new region. Returns the matched stop string, if any;
    /// the text is then truncated before it (or after it when `include_stop`).
    pub fn update(
        &mut self,
        tok: &Tokenizer,
        output: &[u32],
        skip_special: bool,
        stop: &[String],
        include_stop: bool,
    ) -> Option<StopMatch> {
        let (prefix, full) = self.window(tok, output, skip_special);
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token, but not
        // longer than a UTF-8 character can be (the bytes may simply be invalid).
        let waiting = output.len() - self.read_offset;
        if full.len() <= prefix.len() || (full.ends_with('\u{FFFD}') && waiting < 4) {
            return None;
        }
        let new_text = full.get(prefix.len()..)?;
        let before = self.text.len();
        self.text.push_str(new_text);
        self.prefix_offset = self.read_offset;
        self.read_offset = output.len();
        self.find_stop(stop, before, include_stop)
    }

    /// At the end of a sequence: appends the text of tokens still held back (an incomplete
    /// UTF-8 character stays as U+FFFD, as a full decode shows it).
    pub fn flush(&mut self, tok: &Tokenizer, output: &[u32], skip_special: bool) {
        if self.read_offset >= output.len() {
            return;
        }
        let (prefix, full) = self.window(tok, output, skip_special);
        if let Some(rest) = full.get(prefix.len()..) {
            self.text.push_str(rest);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = output.len();
    }

    /// The text already emitted as context, and the same plus the tokens not yet read.
    fn window(&self, tok: &Tokenizer, output: &[u32], skip_special: bool) -> (String, String) {
        let decode = |ids: &[u32]| tok.decode(ids, skip_special).unwrap_or_default();
        (
            decode(&output[self.prefix_offset..self.read_offset]),
            decode(&output[self.prefix_offset..]),
        )
    }

    fn find_stop(&mut self, stop: &[String], before: usize, include: bool) -> Option<StopMatch> {
        let mut best: Option<(usize, &String)> = None;
        for s in stop {
            // A match must end inside the new text: start the search len(s)-1 bytes earlier.
            let mut from = before.saturating_sub(s.len().saturating_sub(1));
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(i) = self.text[from..].find(s.as_str()) {
                let at = from + i;
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, s));
                }
            }
        }
        let (at, s) = best?;
        let cut = if include { at + s.len() } else { at };
        self.text.truncate(cut);
        Some(StopMatch { stop: s.clone() })
    }

    /// The text not yet handed out, holding back the last `hold` bytes (a possible stop-string
    /// prefix) unless the sequence is finished.
    pub fn take_delta(&mut self, finished: bool, hold: usize) -> String {
        let mut end = if finished {
            self.text.len()
        } else {
            self.text.len().saturating_sub(hold)
        };
        while end > self.emitted && !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let d = self.text[self.emitted..end].to_string();
        self.emitted = end;
        d
    }
}
