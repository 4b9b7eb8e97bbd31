//! Continuous batching: which sequences run in the next step and how many of their tokens,
//! under a token budget, a sequence cap and the K/V blocks available; preemption by recompute
//! when blocks run out.

use super::block_manager::{AppendAction, BlockManager};
use super::kv_pool::BlockId;
use super::sequence::{SeqStatus, Sequence};
use halfstep_model::LogitsFor;
use std::collections::{HashMap, VecDeque};

/// Limits the scheduler works within.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (chunked prefill splits prompts to fit).
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// Sequence id.
    pub id: u64,
    /// Position of the first token to compute.
    pub start: usize,
    /// Tokens to compute.
    pub len: usize,
    /// Which logits the step needs.
    pub logits: LogitsFor,
}

/// A step's plan.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// Sequences and token ranges to compute, in batch order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Blocks to copy before the forward (copy-on-write): `(src, dst)`.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sequences preempted in this step.
    pub preempted: usize,
}

/// Owns the sequences and the block manager; decides each step.
pub struct Scheduler {
    config: SchedulerConfig,
    /// The block manager.
    pub blocks: BlockManager,
    /// Every live sequence by id.
    pub seqs: HashMap<u64, Sequence>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    /// Preemptions since start.
    pub num_preemptions: u64,
}

impl Scheduler {
    /// A scheduler over `blocks`.
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a new sequence.
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Adds an already running sequence (an `n > 1` sibling sharing its leader's blocks).
    pub fn add_running(&mut self, seq: Sequence) {
        self.running.push(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Whether anything is queued or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Sequences running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Removes a sequence and releases its blocks (finish or abort).
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.blocks.free(&seq.block_table);
        seq.block_table.clear();
        Some(seq)
    }

    fn preempt(&mut self, id: u64) {
        self.running.retain(|&r| r != id);
        let seq = self.seqs.get_mut(&id).expect("running sequence exists");
        self.blocks.free(&seq.block_table);
        seq.block_table.clear();
        seq.block_hashes.clear();
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        seq.preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let n = self.seqs[&id].num_uncomputed().min(budget);
            let mut scheduled = false;
            loop {
                if self.reserve(id, n, &mut out.copies) {
                    scheduled = true;
                    break;
                }
                // Out of blocks: recompute the newest running sequence later.
                let victim = *self.running.last().expect("running is not empty");
                self.preempt(victim);
                out.preempted += 1;
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            out.scheduled.push(self.plan(id, n));
            budget -= n;
            i += 1;
        }
        // New work joins only when nothing had to give way in this step.
        while out.preempted == 0 && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = &self.seqs[&id];
            let use_cache = seq.request.params.prompt_logprobs.is_none();
            let Some((table, computed)) = self.blocks.allocate_prompt(&seq.tokens, use_cache)
            else {
                break;
            };
            self.waiting.pop_front();
            let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
            seq.block_table = table;
            seq.num_computed = computed;
            if seq.generated.is_empty() && seq.preemptions == 0 {
                seq.cached_prompt_tokens = computed;
            }
            seq.status = SeqStatus::Running;
            let n = seq.num_uncomputed().min(budget);
            self.running.push(id);
            out.scheduled.push(self.plan(id, n));
            budget -= n;
        }
        out
    }

    /// Makes sure positions `num_computed..num_computed+n` have private slots.
    fn reserve(&mut self, id: u64, n: usize, copies: &mut Vec<(BlockId, BlockId)>) -> bool {
        let seq = self.seqs.get_mut(&id).expect("running sequence exists");
        let start = seq.num_computed;
        for pos in start..start + n {
            match self.blocks.prepare_append(&mut seq.block_table, pos) {
                // The table already points at the copy: it must be filled even if a later
                // position fails (a preempted sequence's blocks are simply freed).
                Some(AppendAction::CopyOnWrite { src, dst }) => copies.push((src, dst)),
                Some(_) => {}
                None => return false,
            }
        }
        true
    }

    fn plan(&self, id: u64, n: usize) -> ScheduledSeq {
        let seq = &self.seqs[&id];
        let start = seq.num_computed;
        let reaches_end = start + n == seq.tokens.len();
        let prompt_logprobs = seq.request.params.prompt_logprobs.is_some()
            && seq.sample_index == 0
            && start < seq.prompt_len()
            && seq.generated.is_empty();
        let logits = if prompt_logprobs {
            LogitsFor::All
        } else if reaches_end {
            LogitsFor::Last
        } else {
            LogitsFor::None
        };
        ScheduledSeq {
            id,
            start,
            len: n,
            logits,
        }
    }
}
