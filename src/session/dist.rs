//! A session as one rank of a data-parallel run ([`crate::dist`]). Rank 0 owns the run folder;
//! every other rank resumes a private copy of it that rank 0 sends (config, records and its
//! latest checkpoint: the broadcast of the starting weights), and runs mirrors of rank 0's
//! scripts, rewritten only from what rank 0 sends at each epoch boundary, so no rank ever runs
//! another version.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{ScriptPaths, Session};
use crate::dist::{broadcast_json, Collectives};
use crate::run::{RewardSpec, RunDir};
use crate::script::{Kind, Log};

/// The run-folder files a rank needs to resume rank 0's run.
const RUN_FILES: &[&str] = &["config.json", "metrics.jsonl", "scripts/sources.json", "checkpoint/policy.safetensors", "checkpoint/policy.json", "checkpoint/optimizer.safetensors", "checkpoint/state.json"];

/// One script as rank 0 runs it: its source and imported modules, by path relative to its folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ScriptCopy {
    kind: String,
    file: String,
    source: String,
    imports: Vec<(PathBuf, String)>,
}

impl Session {
    /// Makes this session a rank of `dist`. Rank 0 passes its session (created or resumed) and
    /// checkpoints it; the others pass `None` and get rank 0's run as a private copy under the
    /// system's temporary folder (removed when the session ends).
    pub fn join(root: Option<Session>, dist: Arc<dyn Collectives>, log: Log, device: &candle_core::Device) -> anyhow::Result<Session> {
        let mut session = match root {
            Some(session) => {
                anyhow::ensure!(dist.is_root(), "only rank 0 opens the run folder");
                session.checkpoint()?;
                let files: Vec<(String, Vec<u8>)> = RUN_FILES
                    .iter()
                    .filter_map(|name| std::fs::read(session.run.dir.join(name)).ok().map(|bytes| (name.to_string(), bytes)))
                    .collect();
                dist.broadcast(&mut pack(&files))?;
                broadcast_json(dist.as_ref(), session.script_copies()?)?;
                session
            }
            None => {
                let mut packed = Vec::new();
                dist.broadcast(&mut packed)?;
                let files = unpack(&packed)?;
                let scripts: Vec<ScriptCopy> = broadcast_json(dist.as_ref(), Vec::new())?;
                let scratch = std::env::temp_dir().join(format!("ddpo-rank{}-{}", dist.rank(), std::process::id()));
                let _ = std::fs::remove_dir_all(&scratch);
                copy_run(&scratch, &files, &scripts).with_context(|| format!("rank {}: copying rank 0's run into {}", dist.rank(), scratch.display()))?;
                let mut session = Session::resume(&scratch, None, log, device).with_context(|| format!("rank {}: opening the copy of rank 0's run", dist.rank()))?;
                session.scratch = Some(scratch);
                session
            }
        };
        session.trainer.set_collectives(dist.clone());
        session.dist = dist;
        Ok(session)
    }

    /// The scripts in use, as [`ScriptCopy`]s.
    fn script_copies(&self) -> anyhow::Result<Vec<ScriptCopy>> {
        self.scripts
            .versions()
            .into_iter()
            .map(|(kind, path, version)| {
                let folder = path.parent().unwrap_or(Path::new("."));
                let imports = version
                    .imports
                    .iter()
                    .map(|(p, text)| {
                        let rel = p.strip_prefix(folder).with_context(|| format!("{} imports {}, outside its folder: the other ranks cannot mirror it", path.display(), p.display()))?;
                        Ok((rel.to_path_buf(), text.clone()))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "script.rhai".into());
                Ok(ScriptCopy { kind: kind_name(kind).into(), file, source: version.source.clone(), imports })
            })
            .collect()
    }

    /// At an epoch boundary of a multi-rank run: rank 0 (which has reloaded its scripts) sends
    /// the versions in use; the other ranks write them into their mirrors and reload. Every rank
    /// then checks that all run the same versions.
    pub(super) fn sync_scripts(&mut self) -> anyhow::Result<()> {
        let copies = if self.dist.is_root() { self.script_copies()? } else { Vec::new() };
        let copies = broadcast_json(self.dist.as_ref(), copies)?;
        if let Some(scratch) = &self.scratch {
            write_mirrors(scratch, &copies)?;
            for reload in self.scripts.reload() {
                if let crate::script::ReloadOutcome::Kept { error, .. } = reload.outcome {
                    anyhow::bail!("rank {}: rank 0's version of {} fails here: {error}", self.dist.rank(), reload.file);
                }
            }
        }
        let hashes = crate::dist::all_gather_json(self.dist.as_ref(), &self.scripts.hashes())?;
        if let Some((rank, _)) = hashes.iter().enumerate().find(|(_, h)| *h != &hashes[0]) {
            anyhow::bail!("rank {rank} runs other script versions than rank 0 ({:?} against {:?})", hashes[rank], hashes[0]);
        }
        Ok(())
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Reward => "reward",
        Kind::Prompts => "prompts",
        Kind::Hooks => "hooks",
    }
}

/// Where a rank's mirror of a script lives in its copy of the run.
fn mirror_path(scratch: &Path, copy: &ScriptCopy) -> PathBuf {
    scratch.join("rank-scripts").join(&copy.kind).join(&copy.file)
}

/// Writes each script and its imports into its mirror folder (only what changed, so an
/// unchanged script keeps its file).
fn write_mirrors(scratch: &Path, copies: &[ScriptCopy]) -> anyhow::Result<()> {
    for copy in copies {
        let path = mirror_path(scratch, copy);
        let folder = path.parent().expect("a mirror has a folder").to_path_buf();
        let files = std::iter::once((path, copy.source.as_str())).chain(copy.imports.iter().map(|(rel, text)| (folder.join(rel), text.as_str())));
        for (file, text) in files {
            if std::fs::read_to_string(&file).ok().as_deref() != Some(text) {
                std::fs::create_dir_all(file.parent().expect("a file has a folder"))?;
                crate::io::write_atomic(&file, text.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Lays out rank 0's run files in `scratch`, with its scripts pointing at their mirrors and no
/// gold evaluation (rank 0 alone evaluates; the verdicts are broadcast).
fn copy_run(scratch: &Path, files: &[(String, Vec<u8>)], scripts: &[ScriptCopy]) -> anyhow::Result<()> {
    for (name, bytes) in files {
        let path = scratch.join(name);
        std::fs::create_dir_all(path.parent().expect("a run file has a folder"))?;
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    write_mirrors(scratch, scripts)?;
    let mirror = |kind: &str| scripts.iter().find(|c| c.kind == kind).map(|c| mirror_path(scratch, c));
    let mut config = RunDir::read_config(scratch)?;
    if let (RewardSpec::Script(_), Some(path)) = (&config.reward, mirror("reward")) {
        config.reward = RewardSpec::Script(path);
    }
    config.eval = None;
    crate::io::write_atomic(&scratch.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let paths = ScriptPaths { prompts: mirror("prompts"), hooks: mirror("hooks") };
    paths.save(scratch)
}

/// Files as one message: per file, its name's length (u32), name, length (u64) and bytes.
fn pack(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, bytes) in files {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((bytes.len() as u64).to_le_bytes());
        out.extend(bytes);
    }
    out
}

fn unpack(mut rest: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let take = |n: usize, rest: &mut &[u8]| -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(rest.len() >= n, "rank 0's run files arrived cut short");
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.to_vec())
    };
    while !rest.is_empty() {
        let n = u32::from_le_bytes(take(4, &mut rest)?.try_into().expect("4 bytes")) as usize;
        let name = String::from_utf8(take(n, &mut rest)?)?;
        let len = u64::from_le_bytes(take(8, &mut rest)?.try_into().expect("8 bytes")) as usize;
        files.push((name, take(len, &mut rest)?));
    }
    Ok(files)
}
