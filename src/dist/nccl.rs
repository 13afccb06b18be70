//! The data-parallel group on GPUs (`mpirun -np N ddpo train --device cuda ...`): NCCL sums the
//! gradients on the GPUs, and MPI launches the ranks, carries everything else (rewards, images,
//! scripts, decisions) and hands out NCCL's unique id, the bootstrap NCCL's documentation shows.
//! Each rank drives the GPU of its place on its machine (`dist::local_rank`).

use anyhow::Context;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::mpi::Mpi;
use super::Collectives;

/// MPI's world with one NCCL communicator over the ranks' GPUs.
pub struct Nccl {
    mpi: Mpi,
    comm: Comm,
}

// SAFETY: as for `Mpi`, only the session's main thread calls collectives; the communicator is
// used from that thread alone, on the stream of the device it was made for.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the NCCL communicator of `mpi`'s world on `device`: rank 0 makes the unique id and
    /// MPI broadcasts it, then every rank initialises its end (a collective call).
    pub fn init(mpi: Mpi, device: &candle_core::Device) -> anyhow::Result<Self> {
        let cuda = device.as_cuda_device().context("NCCL needs a CUDA device (--device cuda)")?;
        let mut id = Vec::new();
        if mpi.is_root() {
            let made = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId failed: {e:?}"))?;
            id = made.internal().iter().map(|&c| c as u8).collect();
        }
        mpi.broadcast(&mut id).context("broadcasting NCCL's unique id")?;
        let internal: [std::ffi::c_char; 128] = std::array::from_fn(|i| id.get(i).copied().unwrap_or(0) as std::ffi::c_char);
        let (rank, size) = (mpi.rank(), mpi.size());
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(internal))
            .map_err(|e| anyhow::anyhow!("NCCL communicator init on rank {rank} of {size} failed: {e:?}"))?;
        Ok(Self { mpi, comm })
    }
}

/// The sum over ranks of a contiguous f32 CUDA tensor, as a new tensor (candle's custom op is
/// the public way to reach a tensor's device memory).
struct AllReduceSum<'a>(&'a Comm);

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors; this one is on the CPU")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let src = storage.as_cuda_slice::<f32>()?;
        let n = layout.shape().elem_count();
        let src = match layout.contiguous_offsets() {
            Some((start, end)) if end - start == n => src.slice(start..end),
            _ => candle_core::bail!("NCCL all-reduce needs a contiguous tensor"),
        };
        let device = storage.device.clone();
        // SAFETY: every element is written by the all-reduce before it is read.
        let mut dst = unsafe { device.alloc::<f32>(n) }?;
        self.0.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce failed: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), layout.shape().clone()))
    }
}

impl Collectives for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn all_reduce_sum(&self, values: &mut [f64]) -> anyhow::Result<()> {
        self.mpi.all_reduce_sum(values)
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> anyhow::Result<()> {
        self.mpi.all_reduce_sum_f32(values)
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> anyhow::Result<Tensor> {
        if !t.device().is_cuda() {
            return super::all_reduce_sum_on_host(&self.mpi, t);
        }
        Ok(t.to_dtype(candle_core::DType::F32)?.contiguous()?.apply_op1_no_bwd(&AllReduceSum(&self.comm))?)
    }
    fn all_gather(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.mpi.all_gather(mine)
    }
    fn gather(&self, mine: &[u8]) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        self.mpi.gather(mine)
    }
    fn broadcast(&self, data: &mut Vec<u8>) -> anyhow::Result<()> {
        self.mpi.broadcast(data)
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.mpi.barrier()
    }
    fn abort(&self, code: i32) {
        self.mpi.abort(code)
    }
}
