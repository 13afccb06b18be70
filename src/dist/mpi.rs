//! The MPI process group (Open MPI, MPICH; the `mpi` crate), for `mpirun -np N ddpo train ...`.

use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::Collectives;

/// MPI's world communicator. MPI is initialised for one calling thread (`Funneled`): every
/// collective runs on the main thread, which owns the session.
pub struct Mpi {
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

// SAFETY: the communicator is a handle that MPI lets any thread use under `Funneled` as long as
// only the main thread calls MPI, which the session's one-thread loop guarantees; reward workers
// never touch it.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    pub fn init() -> anyhow::Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialised in this process"))?;
        let world = universe.world();
        // A panicking rank would finalise MPI while unwinding and leave the others waiting in
        // their next collective for ever: abort the whole group instead.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            // SAFETY: MPI is initialised (this hook is set after `initialize`), and MPI_Abort
            // may be called from any thread.
            unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101) };
        }));
        Ok(Self { world, _universe: universe })
    }

    /// Element-wise sum over ranks into `values` (MPI needs a separate send buffer).
    fn sum_in_place<T: mpi::datatype::Equivalence + Clone>(&self, values: &mut [T]) {
        let send = values.to_vec();
        self.world.all_reduce_into(&send[..], values, mpi::collective::SystemOperation::sum());
    }

    fn counts(&self, len: usize) -> anyhow::Result<Vec<Count>> {
        let mine = Count::try_from(len).map_err(|_| anyhow::anyhow!("a message of {len} bytes is over MPI's 2 GiB count"))?;
        let mut counts = vec![0 as Count; self.size()];
        self.world.all_gather_into(&mine, &mut counts[..]);
        Ok(counts)
    }
}

fn displacements(counts: &[Count]) -> Vec<Count> {
    counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect()
}

fn split(buf: Vec<u8>, counts: &[Count]) -> Vec<Vec<u8>> {
    let mut at = 0usize;
    counts
        .iter()
        .map(|&c| {
            let part = buf[at..at + c as usize].to_vec();
            at += c as usize;
            part
        })
        .collect()
}

impl Collectives for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> anyhow::Result<()> {
        self.sum_in_place(values);
        Ok(())
    }

    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> anyhow::Result<()> {
        self.sum_in_place(values);
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        let counts = self.counts(mine.len())?;
        let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        let displs = displacements(&counts);
        let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
        self.world.all_gather_varcount_into(mine, &mut partition);
        Ok(split(buf, &counts))
    }

    fn gather(&self, mine: &[u8]) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        let counts = self.counts(mine.len())?;
        let root = self.world.process_at_rank(0);
        if self.rank() != 0 {
            root.gather_varcount_into(mine);
            return Ok(None);
        }
        let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        let displs = displacements(&counts);
        let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
        root.gather_varcount_into_root(mine, &mut partition);
        Ok(Some(split(buf, &counts)))
    }

    fn broadcast(&self, data: &mut Vec<u8>) -> anyhow::Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = data.len() as u64;
        root.broadcast_into(&mut len);
        data.resize(len as usize, 0);
        root.broadcast_into(&mut data[..]);
        Ok(())
    }

    fn barrier(&self) -> anyhow::Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
}
