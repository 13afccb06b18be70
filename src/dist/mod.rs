//! Data-parallel training over several processes: the collectives the trainer and the session
//! use (all-reduce of gradients, all-gather of rewards, gather of images, broadcast of weights,
//! scripts and decisions, barriers), behind one trait.
//!
//! [`Single`], one process, is the default and costs nothing. [`mpi::Mpi`] (cargo feature `mpi`)
//! runs under `mpirun -np N`, one rank per process, on MPI's own collectives: no protocol of ours.
//! [`nccl::Nccl`] (feature `nccl`) is the same group on GPUs: NCCL sums the gradients where they
//! live, MPI does the rest and hands out NCCL's unique id. Every rank runs the same command line;
//! rank 0 alone writes the run folder.
//!
//! Owns process groups and message formats; not what is sent (the trainer and session decide).

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::sync::Arc;

use anyhow::Context;
use candle_core::{Tensor, Var};

use crate::optim::Grads;

/// The collective operations of a group of `size` processes. Every rank must call the same
/// operations in the same order; rank 0 is the root of broadcasts and gathers.
pub trait Collectives: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place (diagnostics, counts).
    fn all_reduce_sum(&self, values: &mut [f64]) -> anyhow::Result<()>;
    /// The same in f32: gradients, half the bytes of f64.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> anyhow::Result<()>;
    /// Element-wise sum over ranks of an f32 tensor, on the tensor's device. By default through
    /// host memory; a GPU group (`nccl::Nccl`) sums device tensors where they are.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> anyhow::Result<Tensor> {
        all_reduce_sum_on_host(self, t)
    }
    /// Every rank's bytes, in rank order, on every rank.
    fn all_gather(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>>;
    /// Every rank's bytes on rank 0 (in rank order); `None` elsewhere.
    fn gather(&self, mine: &[u8]) -> anyhow::Result<Option<Vec<Vec<u8>>>>;
    /// Rank 0's `data` on every rank (the others' `data` is replaced).
    fn broadcast(&self, data: &mut Vec<u8>) -> anyhow::Result<()>;
    fn barrier(&self) -> anyhow::Result<()>;
    /// Ends every rank of the group now (a failed rank takes the run down with it, so no rank
    /// waits forever in a collective). Only returns for a single process.
    fn abort(&self, code: i32);

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collectives for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _values: &mut [f32]) -> anyhow::Result<()> {
        Ok(())
    }
    fn all_gather(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn gather(&self, mine: &[u8]) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![mine.to_vec()]))
    }
    fn broadcast(&self, _data: &mut Vec<u8>) -> anyhow::Result<()> {
        Ok(())
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn abort(&self, _code: i32) {}
}

/// [`Collectives::all_reduce_sum_tensor`] through host memory: copy out, sum as f32, copy back.
fn all_reduce_sum_on_host<C: Collectives + ?Sized>(c: &C, t: &Tensor) -> anyhow::Result<Tensor> {
    let mut values = t.flatten_all()?.to_vec1::<f32>()?;
    c.all_reduce_sum_f32(&mut values)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
}

/// The single-process group.
pub fn single() -> Arc<dyn Collectives> {
    Arc::new(Single)
}

/// The process group this process was started in: MPI's world when launched by `mpirun` (or
/// any launcher that sets the MPI environment), else a single process; on a CUDA `device` of a
/// build with the `nccl` feature, that world with NCCL for the gradients. A multi-process launch
/// of a build without the `mpi` feature is an error, not N independent runs.
pub fn from_environment(device: &candle_core::Device) -> anyhow::Result<Arc<dyn Collectives>> {
    let launched = launched_size();
    #[cfg(feature = "nccl")]
    if launched.is_some() && device.is_cuda() {
        return Ok(Arc::new(nccl::Nccl::init(mpi::Mpi::init()?, device)?));
    }
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        return Ok(Arc::new(mpi::Mpi::init()?));
    }
    let _ = device;
    if let Some(n) = launched.filter(|&n| n > 1) {
        anyhow::bail!("started as one of {n} MPI ranks, but this build has no MPI support: rebuild with `cargo build --release --features mpi`");
    }
    Ok(single())
}

/// This process's place among the ranks on its machine, as the launcher announced it (0 when
/// started alone): a data-parallel rank's GPU.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// The group size an MPI launcher announced in the environment (Open MPI, MPICH / Hydra, Slurm's PMI).
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// A failure every rank of the group returns at the same point (so none is left waiting in a
/// collective): the failed ranks' own errors, and [`GroupError`] on the others.
#[derive(Debug)]
pub struct GroupError {
    pub rank: usize,
    pub cause: String,
}

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} failed: {}", self.rank, self.cause)
    }
}

impl std::error::Error for GroupError {}

/// Whether `e` failed on every rank together (see [`agree`]), so the ranks can stop in order.
pub fn failed_together(e: &anyhow::Error) -> bool {
    e.downcast_ref::<GroupError>().is_some() || e.downcast_ref::<StopTogether>().is_some()
}

/// Marks an error every rank has (a rank's own error the group learned of through [`agree`],
/// or such an error rewritten on its way out), so that [`failed_together`] stays true.
#[derive(Debug)]
pub struct StopTogether;

impl std::fmt::Display for StopTogether {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("all ranks stop")
    }
}

impl std::error::Error for StopTogether {}

/// Exchanges each rank's outcome of a local step: when any rank failed, every rank returns an
/// error (its own, or [`GroupError`] naming the first failed rank and its cause).
pub fn agree(c: &dyn Collectives, outcome: anyhow::Result<()>) -> anyhow::Result<()> {
    if c.size() == 1 {
        return outcome;
    }
    let mine = outcome.as_ref().err().map(|e| format!("{e:#}"));
    let all = all_gather_json(c, &mine).context("exchanging the ranks' outcomes")?;
    match outcome {
        Err(e) => Err(e.context(StopTogether)),
        Ok(()) => match all.into_iter().enumerate().find_map(|(rank, e)| e.map(|cause| (rank, cause))) {
            Some((rank, cause)) => Err(GroupError { rank, cause }.into()),
            None => Ok(()),
        },
    }
}

/// Sums `grads` (one per variable of `vars`, `None` for a variable without a gradient) over
/// ranks: one small all-reduce of a flag per variable, then one f32 all-reduce of every present
/// gradient, flattened together, on the gradients' device. A variable that has a gradient on any
/// rank gets one on every rank (zero where a rank had none); one without a gradient anywhere
/// stays `None`.
pub fn all_reduce_grads(c: &dyn Collectives, grads: &mut Grads, vars: &[(String, Var)]) -> anyhow::Result<()> {
    if c.size() == 1 {
        return Ok(());
    }
    grads.resize(vars.len(), None);
    let mut present: Vec<f64> = grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
    c.all_reduce_sum(&mut present).context("all-reduce of which variables have gradients")?;
    let mut parts = Vec::new();
    for ((g, (_, var)), &on_some_rank) in grads.iter().zip(vars).zip(&present) {
        if on_some_rank > 0.0 {
            parts.push(match g {
                Some(g) => g.flatten_all()?.to_dtype(candle_core::DType::F32)?,
                None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, var.device())?,
            });
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    let summed = c.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?).context("all-reduce of the gradients")?;
    let mut at = 0;
    for ((g, (_, var)), &on_some_rank) in grads.iter_mut().zip(vars).zip(&present) {
        *g = if on_some_rank > 0.0 {
            let n = var.elem_count();
            let t = summed.narrow(0, at, n)?.reshape(var.shape())?.to_dtype(var.dtype())?;
            at += n;
            Some(t)
        } else {
            None
        };
    }
    Ok(())
}

/// Rank 0's value of `value` on every rank, through JSON.
pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(c: &dyn Collectives, value: T) -> anyhow::Result<T> {
    if c.size() == 1 {
        return Ok(value);
    }
    let mut bytes = if c.is_root() { serde_json::to_vec(&value)? } else { Vec::new() };
    c.broadcast(&mut bytes)?;
    Ok(serde_json::from_slice(&bytes).context("a broadcast message that does not parse")?)
}

/// Every rank's `value`, in rank order, through JSON.
pub fn all_gather_json<T: serde::Serialize + serde::de::DeserializeOwned + Clone>(c: &dyn Collectives, value: &T) -> anyhow::Result<Vec<T>> {
    if c.size() == 1 {
        return Ok(vec![value.clone()]);
    }
    c.all_gather(&serde_json::to_vec(value)?)?
        .iter()
        .map(|b| serde_json::from_slice(b).context("a gathered message that does not parse"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0 of two, whose partner adds `flags` to the f64 sum and `values` to the f32 sum.
    struct Partner {
        flags: Vec<f64>,
        values: Vec<f32>,
    }

    impl Collectives for Partner {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, values: &mut [f64]) -> anyhow::Result<()> {
            anyhow::ensure!(values.len() == self.flags.len(), "{} flags, the partner sent {}", values.len(), self.flags.len());
            values.iter_mut().zip(&self.flags).for_each(|(v, o)| *v += o);
            Ok(())
        }
        fn all_reduce_sum_f32(&self, values: &mut [f32]) -> anyhow::Result<()> {
            anyhow::ensure!(values.len() == self.values.len(), "{} values, the partner sent {}", values.len(), self.values.len());
            values.iter_mut().zip(&self.values).for_each(|(v, o)| *v += o);
            Ok(())
        }
        fn all_gather(&self, _: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
            unreachable!()
        }
        fn gather(&self, _: &[u8]) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
            unreachable!()
        }
        fn broadcast(&self, _: &mut Vec<u8>) -> anyhow::Result<()> {
            unreachable!()
        }
        fn barrier(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn abort(&self, _: i32) {}
    }

    #[test]
    fn gradients_sum_over_ranks_with_zeros_where_a_rank_had_none() -> anyhow::Result<()> {
        let cpu = candle_core::Device::Cpu;
        let vars: Vec<(String, Var)> = [("a", 2), ("b", 3), ("c", 1)]
            .into_iter()
            .map(|(name, n)| Ok((name.to_string(), Var::zeros(n, candle_core::DType::F32, &cpu)?)))
            .collect::<anyhow::Result<_>>()?;
        // This rank has a gradient for `a` only; the partner for `a` and `b`; nobody for `c`.
        let mut grads: Grads = vec![Some(Tensor::new(&[1f32, 2.], &cpu)?)];
        let partner = Partner { flags: vec![1., 1., 0.], values: vec![10., 20., 1., 1., 1.] };
        all_reduce_grads(&partner, &mut grads, &vars)?;
        let got: Vec<Option<Vec<f32>>> = grads.iter().map(|g| g.as_ref().map(|t| t.to_vec1().unwrap())).collect();
        assert_eq!(got, vec![Some(vec![11., 22.]), Some(vec![1., 1., 1.]), None]);
        Ok(())
    }
}
