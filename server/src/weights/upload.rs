//! Reads a safetensors file from a request body as it streams in: the header first, then each
//! tensor in offset order, converted and checked as soon as its bytes are in. The raw file is
//! never held whole.

use super::staging::{RawTensor, Staging};
use futures::{Stream, StreamExt};
use halfstep_model::weights::{SourceDType, WeightError};
use serde_json::Value;

/// The largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

fn bad(message: impl Into<String>) -> WeightError {
    WeightError::Safetensors {
        path: "<upload>".into(),
        message: message.into(),
    }
}

/// Pulls exact byte counts out of a stream of chunks.
struct Reader<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
    consumed: u64,
}

impl<S, B, E> Reader<S>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    async fn fill(&mut self) -> Result<bool, WeightError> {
        match self.stream.next().await {
            Some(Ok(chunk)) => {
                self.buf.drain(..self.pos);
                self.pos = 0;
                self.buf.extend_from_slice(chunk.as_ref());
                Ok(true)
            }
            Some(Err(e)) => Err(bad(format!("reading the body failed: {e}"))),
            None => Ok(false),
        }
    }

    /// The next `n` bytes; `what` names them in the error if the body ends first.
    async fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>, WeightError> {
        // Grow with the bytes that arrive, never to a declared size up front.
        let mut out = Vec::with_capacity(n.min(1 << 16));
        while out.len() < n {
            if self.pos == self.buf.len() && !self.fill().await? {
                return Err(bad(format!(
                    "the body ended after {} bytes, in {what}",
                    self.consumed
                )));
            }
            let k = (n - out.len()).min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
            self.consumed += k as u64;
        }
        Ok(out)
    }

    /// Fills `dst` with the next bytes; `what` names them in the error if the body ends first.
    async fn take_into(&mut self, dst: &mut [u8], what: &str) -> Result<(), WeightError> {
        let mut done = 0;
        while done < dst.len() {
            if self.pos == self.buf.len() && !self.fill().await? {
                return Err(bad(format!(
                    "the body ended after {} bytes, in {what}",
                    self.consumed
                )));
            }
            let k = (dst.len() - done).min(self.buf.len() - self.pos);
            dst[done..done + k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
            done += k;
            self.consumed += k as u64;
        }
        Ok(())
    }

    async fn at_end(&mut self) -> Result<bool, WeightError> {
        while self.pos == self.buf.len() {
            if !self.fill().await? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The bytes of a buffer of plain integers.
fn as_bytes_mut<W: Copy>(v: &mut [W]) -> &mut [u8] {
    // SAFETY: u16/u32 have no padding and every byte pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

struct Entry {
    name: String,
    dtype: SourceDType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

fn parse_dtype(s: &str) -> SourceDType {
    match s {
        "F32" => SourceDType::F32,
        "F16" => SourceDType::F16,
        "BF16" => SourceDType::Bf16,
        "F64" => SourceDType::Other("F64"),
        "I8" => SourceDType::Other("I8"),
        "I32" => SourceDType::Other("I32"),
        "I64" => SourceDType::Other("I64"),
        _ => SourceDType::Other("unsupported"),
    }
}

/// A tensor read from the body, on its way to the converter thread.
struct Received {
    name: String,
    shape: Vec<usize>,
    dtype: SourceDType,
    data: RawTensor,
}

/// Stages every tensor of the safetensors file in `body`; returns the staging and the bytes
/// read. Names, shapes and dtypes are checked from the header before any data is read; the
/// conversion of each tensor runs on its own thread while the next one is received.
pub async fn stage_stream<S, B, E>(
    body: S,
    staging: Box<dyn Staging>,
) -> Result<(Box<dyn Staging>, u64), WeightError>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut r = Reader {
        stream: body,
        buf: Vec::new(),
        pos: 0,
        consumed: 0,
    };
    let entries = read_header(&mut r, &*staging).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Received>(2);
    let converter = std::thread::spawn(move || {
        let mut staging = staging;
        while let Some(t) = rx.blocking_recv() {
            staging.add_raw(&t.name, &t.shape, t.dtype, t.data)?;
        }
        Ok::<_, WeightError>(staging)
    });
    let read = read_data(&mut r, &entries, tx).await;
    let converted = converter
        .join()
        .map_err(|_| bad("the weight converter thread panicked"))?;
    // A conversion error explains a read that stopped early: report it first.
    let staging = converted?;
    read?;
    Ok((staging, r.consumed))
}

async fn read_header<S, B, E>(
    r: &mut Reader<S>,
    staging: &dyn Staging,
) -> Result<Vec<Entry>, WeightError>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let n = u64::from_le_bytes(
        r.take(8, "the header length")
            .await?
            .try_into()
            .expect("8 bytes"),
    );
    if n > MAX_HEADER {
        return Err(bad(format!("header length {n} exceeds {MAX_HEADER}")));
    }
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&r.take(n as usize, "the header").await?)
            .map_err(|e| bad(format!("invalid header JSON: {e}")))?;
    let mut entries = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor '{name}' has no dtype")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid shape")))?;
        let off: Vec<u64> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor '{name}' has invalid data_offsets")))?;
        let dtype = parse_dtype(dtype);
        let width = match dtype {
            SourceDType::F32 => 4,
            SourceDType::F16 | SourceDType::Bf16 => 2,
            _ => 1,
        };
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        if numel.and_then(|n| n.checked_mul(width)) != Some(off[1] - off[0])
            && !matches!(dtype, SourceDType::Other(_))
        {
            return Err(bad(format!(
                "tensor '{name}': data_offsets do not match shape {shape:?}"
            )));
        }
        // Reject before reading any data: wrong name, shape or dtype.
        staging.check(&name, &shape, dtype)?;
        entries.push(Entry {
            name,
            dtype,
            shape,
            start: off[0],
            end: off[1],
        });
    }
    entries.sort_by_key(|e| e.start);
    Ok(entries)
}

async fn read_data<S, B, E>(
    r: &mut Reader<S>,
    entries: &[Entry],
    tx: tokio::sync::mpsc::Sender<Received>,
) -> Result<(), WeightError>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut at = 0u64;
    for e in entries {
        if e.start != at {
            return Err(bad(format!(
                "tensor '{}' does not start where the previous one ends",
                e.name
            )));
        }
        let len = (e.end - e.start) as usize;
        let what = format!("tensor '{}'", e.name);
        // Read straight into a buffer aligned for the elements, so a tensor already in the run
        // dtype becomes the staged tensor without another copy.
        let data = match e.dtype {
            SourceDType::F16 | SourceDType::Bf16 => {
                let mut v = vec![0u16; len / 2];
                r.take_into(as_bytes_mut(&mut v), &what).await?;
                RawTensor::U16(v)
            }
            _ => {
                let mut v = vec![0u32; len / 4];
                r.take_into(as_bytes_mut(&mut v), &what).await?;
                RawTensor::U32(v)
            }
        };
        let t = Received {
            name: e.name.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype,
            data,
        };
        if tx.send(t).await.is_err() {
            // The converter stopped on a bad tensor; its error is the answer.
            return Ok(());
        }
        at = e.end;
    }
    if !r.at_end().await? {
        return Err(bad("trailing bytes after the last tensor"));
    }
    Ok(())
}
