//! The whole-model tape: [`forward_tape`] runs one sequence keeping the activations backward
//! needs, [`backward`] runs the ops' gradients over it into [`Grads`].

use super::ops::{
    attention_backward, attention_forward, causal_probs_len, embedding_backward, embedding_forward,
    linear_backward_bias, linear_backward_input, linear_backward_weight, linear_forward,
    residual_forward, rms_norm_backward, rms_norm_forward, rope_backward, rope_forward,
    silu_gate_backward, silu_gate_forward, RopeTable,
};
use super::{add_into, GradOptions, Grads, Real, TrainWeights};
use crate::kernels::attention::AttentionShape;
use crate::kernels::Kernels;

/// Activations one decoder layer saves for backward.
#[derive(Debug, Clone)]
struct LayerTape<R: Real> {
    /// Residual stream entering the layer, `[t, hidden]`.
    h_in: Vec<R>,
    inv_rms_attn: Vec<R>,
    /// After RoPE.
    q: Vec<R>,
    k: Vec<R>,
    v: Vec<R>,
    probs: Vec<R>,
    att: Vec<R>,
    /// Residual stream between attention and MLP.
    h_mid: Vec<R>,
    inv_rms_mlp: Vec<R>,
    gate: Vec<R>,
    up: Vec<R>,
}

/// The forward of one sequence with what backward needs.
#[derive(Debug, Clone)]
pub struct Tape<R: Real = f32> {
    /// Logits of the requested rows, `rows × vocab_size`, in request order.
    pub logits: Vec<R>,
    tokens: Vec<u32>,
    logit_rows: Vec<usize>,
    rope: RopeTable<R>,
    layers: Vec<LayerTape<R>>,
    /// Final residual stream at the logit rows, its inverse RMS and the normed rows.
    h_final: Vec<R>,
    inv_rms_final: Vec<R>,
    normed_final: Vec<R>,
}

impl<R: Real> Tape<R> {
    /// The sequence's tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The positions whose logits the tape holds.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logit_rows
    }
}

/// Runs the model over `tokens` at positions `0..tokens.len()` without rounding, keeping the
/// activations backward needs; logits only for `logit_rows` (the LM head is the costliest
/// product per row).
///
/// # Panics
/// If a token is outside the vocabulary, the sequence is longer than the model's context or a
/// logit row is not a position of the sequence (the trainer's tokens have passed the shared
/// forward, which reports these as errors).
pub fn forward_tape<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tokens: &[u32],
    logit_rows: &[usize],
) -> Tape<R> {
    let c = &w.config;
    let t = tokens.len();
    let (hid, qd, kvd, inter, vocab) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    );
    if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= vocab) {
        panic!("token {bad} is outside the vocabulary ({vocab})");
    }
    assert!(
        t <= w.rope.max_positions(),
        "{t} tokens exceed the model's context ({})",
        w.rope.max_positions()
    );
    if let Some(&bad) = logit_rows.iter().find(|&&r| r >= t) {
        panic!("logit row {bad} is beyond the {t} tokens");
    }
    let level = kern.level;
    let eps = R::from_f64(c.rms_norm_eps as f32 as f64);
    let shape = AttentionShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let rope = RopeTable::new(&w.rope, c.head_dim, t);
    let mut h = vec![R::ZERO; t * hid];
    embedding_forward(w.value(w.embed), hid, tokens, &mut h);
    let mut xn = vec![R::ZERO; t * hid];
    let mut branch = vec![R::ZERO; t * hid];
    let mut layers = Vec::with_capacity(w.layers.len());
    for ids in &w.layers {
        let h_in = h.clone();
        let mut inv_rms_attn = vec![R::ZERO; t];
        rms_norm_forward(
            level,
            &h,
            w.value(ids.attn_norm),
            eps,
            &mut xn,
            &mut inv_rms_attn,
        );
        let bias = |j: usize| ids.qkv_bias.map(|b| w.value(b[j]));
        let mut q = vec![R::ZERO; t * qd];
        let mut k = vec![R::ZERO; t * kvd];
        let mut v = vec![R::ZERO; t * kvd];
        linear_forward(kern, &xn, t, hid, w.value(ids.q), qd, bias(0), &mut q);
        linear_forward(kern, &xn, t, hid, w.value(ids.k), kvd, bias(1), &mut k);
        linear_forward(kern, &xn, t, hid, w.value(ids.v), kvd, bias(2), &mut v);
        rope_forward(&rope, &mut q, qd);
        rope_forward(&rope, &mut k, kvd);
        let mut probs = vec![R::ZERO; causal_probs_len(shape, t)];
        let mut att = vec![R::ZERO; t * qd];
        attention_forward(kern, shape, t, &q, &k, &v, &mut att, &mut probs);
        linear_forward(kern, &att, t, qd, w.value(ids.o), hid, None, &mut branch);
        residual_forward(&mut h, &branch);
        let h_mid = h.clone();
        let mut inv_rms_mlp = vec![R::ZERO; t];
        rms_norm_forward(
            level,
            &h,
            w.value(ids.mlp_norm),
            eps,
            &mut xn,
            &mut inv_rms_mlp,
        );
        let mut gate = vec![R::ZERO; t * inter];
        let mut up = vec![R::ZERO; t * inter];
        linear_forward(kern, &xn, t, hid, w.value(ids.gate), inter, None, &mut gate);
        linear_forward(kern, &xn, t, hid, w.value(ids.up), inter, None, &mut up);
        let mut act = vec![R::ZERO; t * inter];
        silu_gate_forward(&gate, &up, &mut act);
        linear_forward(
            kern,
            &act,
            t,
            inter,
            w.value(ids.down),
            hid,
            None,
            &mut branch,
        );
        residual_forward(&mut h, &branch);
        layers.push(LayerTape {
            h_in,
            inv_rms_attn,
            q,
            k,
            v,
            probs,
            att,
            h_mid,
            inv_rms_mlp,
            gate,
            up,
        });
    }
    let n = logit_rows.len();
    let mut h_final = vec![R::ZERO; n * hid];
    for (dst, &r) in h_final.chunks_exact_mut(hid).zip(logit_rows) {
        dst.copy_from_slice(&h[r * hid..(r + 1) * hid]);
    }
    let mut inv_rms_final = vec![R::ZERO; n];
    let mut normed_final = vec![R::ZERO; n * hid];
    rms_norm_forward(
        level,
        &h_final,
        w.value(w.norm),
        eps,
        &mut normed_final,
        &mut inv_rms_final,
    );
    let mut logits = vec![R::ZERO; n * vocab];
    linear_forward(
        kern,
        &normed_final,
        n,
        hid,
        w.value(w.lm_head),
        vocab,
        None,
        &mut logits,
    );
    Tape {
        logits,
        tokens: tokens.to_vec(),
        logit_rows: logit_rows.to_vec(),
        rope,
        layers,
        h_final,
        inv_rms_final,
        normed_final,
    }
}

/// Adds the gradients of the loss whose gradient with respect to `tape.logits` is `dlogits`
/// (same rows) to `grads`, for the parameters `opts` trains.
///
/// # Panics
/// If `grads` was built for other options or weights, the tape for another model, or `dlogits`
/// has the wrong length.
pub fn backward<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tape: &Tape<R>,
    dlogits: &[R],
    opts: &GradOptions,
    grads: &mut Grads<R>,
) {
    let c = &w.config;
    assert_eq!(
        grads.options, *opts,
        "gradients were built for other options"
    );
    assert_eq!(
        grads.names, w.names,
        "gradients were built for another model"
    );
    assert_eq!(
        tape.layers.len(),
        w.layers.len(),
        "the tape is from another model"
    );
    let (hid, vocab) = (c.hidden_size, c.vocab_size);
    let n = tape.logit_rows.len();
    assert_eq!(dlogits.len(), n * vocab, "dlogits must be rows × vocab");
    let level = kern.level;
    let n_layers = w.layers.len();
    let first = opts.first_trainable_layer.min(n_layers);
    let layers_trainable = first < n_layers;

    if let Some(g) = grads.slot(w.lm_head) {
        linear_backward_weight(kern, &tape.normed_final, n, hid, dlogits, vocab, g);
    }
    if !layers_trainable && grads.slot(w.norm).is_none() {
        return;
    }
    let mut dnormed = vec![R::ZERO; n * hid];
    linear_backward_input(
        kern,
        dlogits,
        n,
        vocab,
        w.transposed(kern, w.lm_head),
        hid,
        &mut dnormed,
    );
    let mut dsel = vec![R::ZERO; n * hid];
    rms_norm_backward(
        level,
        &tape.h_final,
        w.value(w.norm),
        &tape.inv_rms_final,
        &dnormed,
        &mut dsel,
        grads.slot(w.norm),
    );
    if !layers_trainable {
        return;
    }
    let t = tape.tokens.len();
    // Gradient of the residual stream, flowing down through the layers.
    let mut dh = vec![R::ZERO; t * hid];
    for (src, &r) in dsel.chunks_exact(hid).zip(&tape.logit_rows) {
        add_into(&mut dh[r * hid..(r + 1) * hid], src);
    }
    for l in (first..n_layers).rev() {
        layer_backward(w, kern, tape, l, &mut dh, grads);
    }
    if first == 0 {
        if let Some(g) = grads.slot(w.embed) {
            embedding_backward(g, hid, &tape.tokens, &dh);
        }
    }
}

/// Backward through decoder layer `l`: `dh` enters as the gradient of the layer's output stream
/// and leaves as that of its input.
fn layer_backward<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tape: &Tape<R>,
    l: usize,
    dh: &mut [R],
    grads: &mut Grads<R>,
) {
    let c = &w.config;
    let (hid, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let level = kern.level;
    let eps = R::from_f64(c.rms_norm_eps as f32 as f64);
    let shape = AttentionShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let t = tape.tokens.len();
    let ids = &w.layers[l];
    let lt = &tape.layers[l];
    let mut scratch_inv = vec![R::ZERO; t];

    // MLP: h_out = h_mid + down(silu(gate) ⊙ up), gate/up = Linear(RMSNorm(h_mid)). The
    // residual passes dh through unchanged and hands the branch the same dh.
    let mut xn = vec![R::ZERO; t * hid];
    let w_mlp_norm = w.value(ids.mlp_norm);
    rms_norm_forward(level, &lt.h_mid, w_mlp_norm, eps, &mut xn, &mut scratch_inv);
    let mut act = vec![R::ZERO; t * inter];
    silu_gate_forward(&lt.gate, &lt.up, &mut act);
    if let Some(g) = grads.slot(ids.down) {
        linear_backward_weight(kern, &act, t, inter, dh, hid, g);
    }
    let mut dact = vec![R::ZERO; t * inter];
    linear_backward_input(
        kern,
        dh,
        t,
        hid,
        w.transposed(kern, ids.down),
        inter,
        &mut dact,
    );
    drop(act);
    let mut dgate = vec![R::ZERO; t * inter];
    let mut dup = vec![R::ZERO; t * inter];
    silu_gate_backward(&lt.gate, &lt.up, &dact, &mut dgate, &mut dup);
    drop(dact);
    if let Some(g) = grads.slot(ids.gate) {
        linear_backward_weight(kern, &xn, t, hid, &dgate, inter, g);
    }
    if let Some(g) = grads.slot(ids.up) {
        linear_backward_weight(kern, &xn, t, hid, &dup, inter, g);
    }
    let mut dxn = vec![R::ZERO; t * hid];
    linear_backward_input(
        kern,
        &dgate,
        t,
        inter,
        w.transposed(kern, ids.gate),
        hid,
        &mut dxn,
    );
    linear_backward_input(
        kern,
        &dup,
        t,
        inter,
        w.transposed(kern, ids.up),
        hid,
        &mut dxn,
    );
    drop((dgate, dup));
    rms_norm_backward(
        level,
        &lt.h_mid,
        w_mlp_norm,
        &lt.inv_rms_mlp,
        &dxn,
        dh,
        grads.slot(ids.mlp_norm),
    );

    // Attention: h_mid = h_in + o(attention(rope(q), rope(k), v)), q/k/v = Linear(RMSNorm(h_in)).
    if let Some(g) = grads.slot(ids.o) {
        linear_backward_weight(kern, &lt.att, t, qd, dh, hid, g);
    }
    let mut datt = vec![R::ZERO; t * qd];
    linear_backward_input(kern, dh, t, hid, w.transposed(kern, ids.o), qd, &mut datt);
    let mut dq = vec![R::ZERO; t * qd];
    let mut dk = vec![R::ZERO; t * kvd];
    let mut dv = vec![R::ZERO; t * kvd];
    attention_backward(
        kern, shape, t, &lt.q, &lt.k, &lt.v, &lt.probs, &datt, &mut dq, &mut dk, &mut dv,
    );
    drop(datt);
    rope_backward(&tape.rope, &mut dq, qd);
    rope_backward(&tape.rope, &mut dk, kvd);
    let w_attn_norm = w.value(ids.attn_norm);
    rms_norm_forward(level, &lt.h_in, w_attn_norm, eps, &mut xn, &mut scratch_inv);
    dxn.fill(R::ZERO);
    let projections = [(ids.q, &dq, qd), (ids.k, &dk, kvd), (ids.v, &dv, kvd)];
    for (j, &(id, dy, width)) in projections.iter().enumerate() {
        if let Some(g) = grads.slot(id) {
            linear_backward_weight(kern, &xn, t, hid, dy, width, g);
        }
        if let Some(g) = ids.qkv_bias.and_then(|b| grads.slot(b[j])) {
            linear_backward_bias(dy, width, g);
        }
        linear_backward_input(kern, dy, t, width, w.transposed(kern, id), hid, &mut dxn);
    }
    rms_norm_backward(
        level,
        &lt.h_in,
        w_attn_norm,
        &lt.inv_rms_attn,
        &dxn,
        dh,
        grads.slot(ids.attn_norm),
    );
}
