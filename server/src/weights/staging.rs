//! Staged tensors in the run dtype, checked one by one as they arrive, and a read-only view of
//! the serving weights.

use halfstep_model::dtype::ElemKind;
use halfstep_model::forward::to_run_dtype;
use halfstep_model::weights::safetensors::bytes_to_f32;
use halfstep_model::weights::{
    expected_tensors, is_ignorable, SourceDType, TensorSource, WeightError,
};
use halfstep_model::{DType, Elem, Model, ModelConfig};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tensors being collected for one update, already in the run dtype.
pub trait Staging: Send + Sync {
    /// Checks and converts one tensor (HF name, shape, f32 values); duplicates replace.
    fn add(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), WeightError>;
    /// Checks a tensor's name, shape and dtype before its data is read.
    fn check(&self, name: &str, shape: &[usize], dtype: SourceDType) -> Result<(), WeightError>;
    /// Checks and converts one tensor given as little-endian bytes of `dtype`.
    fn add_bytes(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: SourceDType,
        bytes: &[u8],
    ) -> Result<(), WeightError>;
    /// Like [`Staging::add_bytes`], taking ownership of an element-aligned buffer (no copy when
    /// it is already in the run dtype).
    fn add_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: SourceDType,
        data: RawTensor,
    ) -> Result<(), WeightError> {
        self.add_bytes(name, shape, dtype, data.bytes())
    }
    /// Tensors staged so far.
    fn len(&self) -> usize;
    /// Whether nothing is staged.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes staged (in the run dtype).
    fn bytes(&self) -> usize;
    /// Time spent converting and checking.
    fn elapsed(&self) -> Duration;
    /// Hands the staged tensors over for the swap.
    fn finish(self: Box<Self>) -> StagedUpdate;
}

/// A tensor's raw little-endian elements, read into a buffer aligned for them.
pub enum RawTensor {
    /// 16-bit elements (F16, BF16).
    U16(Vec<u16>),
    /// 32-bit elements (F32).
    U32(Vec<u32>),
}

impl RawTensor {
    /// The buffer as bytes.
    pub fn bytes(&self) -> &[u8] {
        fn of<W: Copy>(v: &[W]) -> &[u8] {
            // SAFETY: plain integers: no padding, every byte initialised.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        match self {
            RawTensor::U16(v) => of(v),
            RawTensor::U32(v) => of(v),
        }
    }
}

/// Reuses an integer buffer as elements of `T` when both have the same size and alignment.
fn reuse<W, T: Elem>(v: Vec<W>) -> Vec<T> {
    assert!(
        std::mem::size_of::<W>() == std::mem::size_of::<T>()
            && std::mem::align_of::<W>() == std::mem::align_of::<T>()
    );
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment (asserted) and T is plain bits, so the allocation's
    // layout is unchanged and every element is a valid T.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// Staged tensors ready to swap in (type-erased `Vec<(name, Arc<Vec<T>>)>`).
pub struct StagedUpdate {
    /// The tensors, for the engine to downcast to its run dtype.
    pub tensors: Box<dyn Any + Send>,
    /// How many.
    pub count: usize,
    /// Bytes in the run dtype.
    pub bytes: usize,
    /// Time spent staging (conversion and checks).
    pub stage_time: Duration,
    /// The part of it spent checking names, shapes, dtypes.
    pub validate_time: Duration,
}

/// The typed staging buffer of a model in run dtype `T`.
pub struct TypedStaging<T: Elem> {
    config: ModelConfig,
    expected: Arc<HashMap<String, Vec<usize>>>,
    tensors: Vec<(String, Arc<Vec<T>>)>,
    bytes: usize,
    elapsed: Duration,
    // Nanoseconds in `check` (which takes &self, so an atomic).
    validate_ns: std::sync::atomic::AtomicU64,
}

impl<T: Elem> TypedStaging<T> {
    /// An empty staging buffer for a model with `config`.
    pub fn new(config: ModelConfig) -> Self {
        let expected = expected_tensors(&config)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        TypedStaging {
            config,
            expected: Arc::new(expected),
            tensors: Vec::new(),
            bytes: 0,
            elapsed: Duration::ZERO,
            validate_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl<T: Elem> TypedStaging<T> {
    fn check_inner(
        &self,
        name: &str,
        shape: &[usize],
        dtype: SourceDType,
    ) -> Result<(), WeightError> {
        if is_ignorable(name, &self.config) {
            return Ok(());
        }
        let want = self
            .expected
            .get(name)
            .ok_or_else(|| WeightError::Unexpected(name.to_string()))?;
        if want.as_slice() != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: want.clone(),
                got: shape.to_vec(),
            });
        }
        if let SourceDType::Other(d) = dtype {
            return Err(WeightError::DType {
                name: name.to_string(),
                dtype: d.to_string(),
            });
        }
        Ok(())
    }

    fn add_values(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
    ) -> Result<(), WeightError> {
        let t0 = Instant::now();
        self.check(name, shape, SourceDType::F32)?;
        if is_ignorable(name, &self.config) {
            return Ok(());
        }
        let data = to_run_dtype::<T>(name, values)?;
        self.put(name, data, t0);
        Ok(())
    }

    /// Stores a converted tensor (replacing an earlier one of the same name).
    fn put(&mut self, name: &str, data: Vec<T>, t0: Instant) {
        let data = Arc::new(data);
        self.bytes += data.len() * std::mem::size_of::<T>();
        if let Some(slot) = self.tensors.iter_mut().find(|(n, _)| n == name) {
            self.bytes -= slot.1.len() * std::mem::size_of::<T>();
            slot.1 = data;
        } else {
            self.tensors.push((name.to_string(), data));
        }
        self.elapsed += t0.elapsed();
    }
}

impl<T: Elem> Staging for TypedStaging<T> {
    fn check(&self, name: &str, shape: &[usize], dtype: SourceDType) -> Result<(), WeightError> {
        let t0 = Instant::now();
        let r = self.check_inner(name, shape, dtype);
        self.validate_ns.fetch_add(
            t0.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        r
    }

    fn add(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), WeightError> {
        self.add_values(name, shape, values)
    }

    fn add_bytes(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: SourceDType,
        bytes: &[u8],
    ) -> Result<(), WeightError> {
        let t0 = Instant::now();
        self.check(name, shape, dtype)?;
        if is_ignorable(name, &self.config) {
            return Ok(());
        }
        let data = bytes_to_elems::<T>(name, dtype, bytes)?;
        self.put(name, data, t0);
        Ok(())
    }

    fn add_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: SourceDType,
        data: RawTensor,
    ) -> Result<(), WeightError> {
        let same = matches!(
            (dtype, T::KIND, &data),
            (SourceDType::F16, ElemKind::F16, RawTensor::U16(_))
                | (SourceDType::Bf16, ElemKind::Bf16, RawTensor::U16(_))
                | (SourceDType::F32, ElemKind::F32, RawTensor::U32(_))
        );
        if !same {
            return self.add_bytes(name, shape, dtype, data.bytes());
        }
        let t0 = Instant::now();
        self.check(name, shape, dtype)?;
        if is_ignorable(name, &self.config) {
            return Ok(());
        }
        let elems: Vec<T> = match data {
            RawTensor::U16(v) => reuse(v),
            RawTensor::U32(v) => reuse(v),
        };
        if let Some(i) = first_non_finite(&elems) {
            return Err(WeightError::NonFinite {
                name: name.to_string(),
                index: i,
            });
        }
        self.put(name, elems, t0);
        Ok(())
    }

    fn len(&self) -> usize {
        self.tensors.len()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn elapsed(&self) -> Duration {
        self.elapsed
    }

    fn finish(self: Box<Self>) -> StagedUpdate {
        StagedUpdate {
            count: self.tensors.len(),
            bytes: self.bytes,
            stage_time: self.elapsed,
            validate_time: Duration::from_nanos(
                self.validate_ns.load(std::sync::atomic::Ordering::Relaxed),
            ),
            tensors: Box::new(self.tensors),
        }
    }
}

// Weights are copied as raw little-endian bits.
#[cfg(not(target_endian = "little"))]
compile_error!("halfstep's weight staging assumes a little-endian host");

/// Index of the first inf/NaN in `v`, from the exponent bits, in blocks the compiler vectorises.
fn first_non_finite<T: Elem>(v: &[T]) -> Option<usize> {
    fn scan<B: Copy + Into<u32>>(bits: &[B], mask: u32) -> Option<usize> {
        const BLOCK: usize = 4096;
        let bad = |b: &B| (*b).into() & mask == mask;
        for (k, chunk) in bits.chunks(BLOCK).enumerate() {
            if chunk.iter().fold(false, |acc, b| acc | bad(b)) {
                return chunk.iter().position(bad).map(|i| k * BLOCK + i);
            }
        }
        None
    }
    // SAFETY: f16/bf16 are 16-bit and f32 is 32-bit plain data; reading their bits is sound.
    unsafe {
        match T::KIND {
            ElemKind::F16 => scan(
                std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()),
                0x7c00,
            ),
            ElemKind::Bf16 => scan(
                std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()),
                0x7f80,
            ),
            ElemKind::F32 => scan(
                std::slice::from_raw_parts(v.as_ptr() as *const u32, v.len()),
                0x7f80_0000,
            ),
        }
    }
}

/// Converts little-endian `bytes` of `dtype` to `T` in one pass, rejecting non-finite values.
fn bytes_to_elems<T: Elem>(
    name: &str,
    dtype: SourceDType,
    bytes: &[u8],
) -> Result<Vec<T>, WeightError> {
    let width = match dtype {
        SourceDType::F32 => 4,
        SourceDType::F16 | SourceDType::Bf16 => 2,
        _ => {
            return Err(WeightError::DType {
                name: name.to_string(),
                dtype: dtype.to_string(),
            });
        }
    };
    let same = matches!(
        (dtype, T::KIND),
        (SourceDType::F16, ElemKind::F16)
            | (SourceDType::Bf16, ElemKind::Bf16)
            | (SourceDType::F32, ElemKind::F32)
    );
    if same {
        // Already in the run dtype: one copy of the bits, then a scan of the exponents.
        let n = bytes.len() / width;
        let mut out: Vec<T> = Vec::with_capacity(n);
        // SAFETY: T is f16/bf16/f32 with exactly `width` bytes of plain bits (checked above);
        // little-endian hosts only (x86-64, aarch64), where the file's byte order is native.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, n * width);
            out.set_len(n);
        }
        if let Some(i) = first_non_finite(&out) {
            return Err(WeightError::NonFinite {
                name: name.to_string(),
                index: i,
            });
        }
        return Ok(out);
    }
    let values = bytes_to_f32(dtype, bytes).expect("dtype checked above");
    to_run_dtype::<T>(name, &values)
}

/// Stages every tensor of a checkpoint on disk (any subset of the model's tensors).
pub fn stage_source(staging: &mut dyn Staging, src: &dyn TensorSource) -> Result<(), WeightError> {
    let infos = src.tensor_infos();
    for (name, info) in &infos {
        staging.check(name, &info.shape, info.dtype)?;
    }
    for (name, info) in infos {
        if let Some((dtype, bytes)) = src.raw_bytes(&name) {
            staging.add_bytes(&name, &info.shape, dtype, bytes)?;
        } else {
            let values = src.read_f32(&name)?;
            staging.add(&name, &info.shape, &values)?;
        }
    }
    Ok(())
}

/// A read-only view of the serving weights (a cheap snapshot: tensors are shared).
pub trait WeightsView: Send + Sync {
    /// Run dtype.
    fn dtype(&self) -> DType;
    /// Tensor names in canonical order.
    fn names(&self) -> Vec<String>;
    /// Shape of a tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A tensor's values widened to f32.
    fn values(&self, name: &str) -> Option<Vec<f32>>;
    /// Bytes of all tensors in the run dtype.
    fn num_bytes(&self) -> usize;
    /// A checksum over every tensor's name and bits, in canonical order.
    fn checksum(&self) -> String;
}

impl<T: Elem> WeightsView for Model<T> {
    fn dtype(&self) -> DType {
        T::DTYPE
    }
    fn names(&self) -> Vec<String> {
        self.param_names().to_vec()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.param(name).map(|p| p.shape.clone())
    }
    fn values(&self, name: &str) -> Option<Vec<f32>> {
        self.param(name)
            .map(|p| p.data.iter().map(|x| x.to_f32()).collect())
    }
    fn num_bytes(&self) -> usize {
        self.params()
            .iter()
            .map(|p| p.data.len() * std::mem::size_of::<T>())
            .sum()
    }
    fn checksum(&self) -> String {
        // FNV-1a over names and raw element bytes: a fingerprint, not a security measure.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h ^= x as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, p) in self.param_names().iter().zip(self.params()) {
            eat(name.as_bytes());
            let data: &[T] = &p.data;
            // SAFETY: T is f16, bf16 or f32 (plain bits); viewing them as bytes is sound.
            let bytes = unsafe {
                std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
            };
            eat(bytes);
        }
        format!("{h:016x}")
    }
}
